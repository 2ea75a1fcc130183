"""The `dsv3` command line. Each command lives in its own module; this one wires them and turns
user errors into one line on stderr with a non-zero exit (tracebacks only with --debug)."""

from __future__ import annotations

import logging
import sys

import click

from ..core.errors import DsvError

EXIT_USER_ERROR = 2


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(e, DsvError):
                click.echo(f"error: {e}", err=True)
                sys.exit(EXIT_USER_ERROR)
            if isinstance(e, (OSError, ValueError)):
                click.echo(f"error: {e} (run with --debug for the traceback)", err=True)
                sys.exit(EXIT_USER_ERROR)
            click.echo(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what is loaded and how (to stderr).")
@click.version_option(package_name="dsv3")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """DeepSeek-V3 on NVIDIA, AMD, Ascend and CPUs from one model core.

    \b
    Start here (no weights needed):
      dsv3 demo /tmp/dsv3-demo                  # a tiny random checkpoint in the released FP8 layout
      dsv3 run /tmp/dsv3-demo --prompt "Hello"  # convert-free: the FP8 files load as they are
    \b
    Real checkpoints:
      dsv3 backends                             # what can run here, and why not
      dsv3 run /models/DeepSeek-V3 --backend auto --prompt "..."
      dsv3 bench /models/DeepSeek-V3 --batch 1,8,32   # prefill and decode speed on this machine
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="dsv3: %(message)s",
                        stream=sys.stderr)


def _register() -> None:
    from .backends_cmd import backends
    from .bench_cmd import bench
    from .convert_cmd import convert
    from .demo_cmd import demo
    from .run_cmd import run
    from .serve_cmd import serve

    for cmd in (backends, demo, run, serve, bench, convert):
        main.add_command(cmd)


_register()
