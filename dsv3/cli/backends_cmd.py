from __future__ import annotations

import click


@click.command()
def backends() -> None:
    """List every backend, whether it is usable here, and why not.

    `--backend auto` picks the first usable of cuda, rocm, ascend, cpu.
    """
    from ..backends import AUTO_ORDER, get_class, names, status

    chosen = None
    rows = []
    for name in names():
        ok, why = status(name)
        try:
            cls = get_class(name)
            info = f"device={cls.device_type} dist={cls.dist_backend}"
        except Exception:
            info = ""
        rows.append((name, ok, why, info))
    for name in AUTO_ORDER:
        if any(r[0] == name and r[1] for r in rows):
            chosen = name
            break
    for name, ok, why, info in rows:
        mark = "usable " if ok else "no     "
        auto = "  <- auto" if name == chosen else ""
        click.echo(f"{name:8s} {mark} {info:28s} {why}{auto}")
