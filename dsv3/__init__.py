"""dsv3: DeepSeek-V3 on NVIDIA, AMD, Ascend and CPUs from one hardware-agnostic core.

    import dsv3
    engine = dsv3.load("path/to/ckpt", backend="auto", dtype="bf16")
    logits = engine.logits(token_ids)                  # [B, S] -> [B, S, vocab]
    out = engine.generate(prompts, max_new_tokens=32)  # list[list[int]]
"""

from .engine import Engine, load

__version__ = "0.1.0"


def list_backends() -> dict[str, tuple[bool, str]]:
    """Every registered backend -> (usable here, why)."""
    from .backends import names, status

    return {name: status(name) for name in names()}


__all__ = ["load", "Engine", "list_backends", "__version__"]
