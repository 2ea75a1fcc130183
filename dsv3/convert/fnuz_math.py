"""e4m3fn -> e4m3fnuz, shared by `dsv3 convert fnuz` and the rocm backend's load path.

The same bit pattern reads as half the value in fnuz (exponent bias 8 instead of 7), so the bytes
are kept and the block scale doubles. Two fn bytes need care: 0x80 is -0 in fn but NaN in fnuz
(it becomes 0x00), and 0x7F/0xFF are NaN in fn but ±240 in fnuz (reported, never mapped silently).
"""

from __future__ import annotations

import torch

FN_NAN_BYTES = (0x7F, 0xFF)


def fn_nan_count(weight: torch.Tensor) -> int:
    b = weight.view(torch.uint8)
    return int(((b == 0x7F) | (b == 0xFF)).sum())


def fn_to_fnuz(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(e4m3fn weight, scale) -> (e4m3fnuz weight, 2 * scale); raises ValueError on fn NaN bytes."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"expected float8_e4m3fn, got {weight.dtype}")
    nans = fn_nan_count(weight)
    if nans:
        raise ValueError(f"{nans} NaN bytes (0x7F/0xFF) in an e4m3fn weight; they have no fnuz equivalent")
    b = weight.view(torch.uint8)
    b = torch.where(b == 0x80, torch.zeros_like(b), b)  # fn -0 would be fnuz NaN
    return b.view(torch.float8_e4m3fnuz), (None if scale is None else scale.float() * 2)


def fnuz_to_fn(weight: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(e4m3fnuz weight, scale) -> (e4m3fn weight, scale / 2): the inverse of fn_to_fnuz; raises on fnuz NaN (0x80)."""
    if weight.dtype != torch.float8_e4m3fnuz:
        raise ValueError(f"expected float8_e4m3fnuz, got {weight.dtype}")
    nans = int((weight.view(torch.uint8) == 0x80).sum())
    if nans:
        raise ValueError(f"{nans} NaN bytes (0x80) in an e4m3fnuz weight")
    return weight.view(torch.uint8).view(torch.float8_e4m3fn), (None if scale is None else scale.float() / 2)


def to_format(weight: torch.Tensor, scale: torch.Tensor | None, fp8_dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same real values in the FP8 flavour a GPU computes in (bytes kept, scale doubled or halved)."""
    if weight.dtype == fp8_dtype:
        return weight, scale
    if fp8_dtype == torch.float8_e4m3fnuz:
        return fn_to_fnuz(weight, scale)
    return fnuz_to_fn(weight, scale)
