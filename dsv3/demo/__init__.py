"""Tiny random checkpoints in the released format: the embedded default and the test fixture."""

from .checkpoint import BENCH_280M, DEMO, write_checkpoint

__all__ = ["DEMO", "BENCH_280M", "write_checkpoint"]
