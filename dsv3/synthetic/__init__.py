"""Synthetic checkpoints: tiny random weights in the released format, the embedded default behind
`dsv3 demo` and the test fixture. (Not the official demo, whose tensor names core/names.py maps.)"""

from .checkpoint import BENCH_280M, DEMO, write_checkpoint

__all__ = ["DEMO", "BENCH_280M", "write_checkpoint"]
