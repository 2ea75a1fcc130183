"""Independent references: transformers' DeepseekV3ForCausalLM on the same weights.

The dequantization here is a few lines written for the tests, not dsv3's, and the checkpoint
is read with the `safetensors` library, not dsv3's reader.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read_dequantized(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF-layout checkpoint in fp32, FP8 weights multiplied out by their block scales."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    raw = {}
    for name, fname in index.items():
        with safe_open(str(ckpt / fname), "pt") as f:
            raw[name] = f.get_tensor(name)
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = raw[name + "_scale_inv"]
            n, k = t.shape
            full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
            out[name] = t.float() * full
        else:
            out[name] = t.float()
    return out


def write_hf_reference(ckpt: Path, dst: Path) -> Path:
    """A BF16-layout (fp32 values) copy of ckpt that transformers can load, main model only."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "float32"
    n = cfg["num_hidden_layers"]
    state = {k: v.contiguous() for k, v in read_dequantized(ckpt).items()
             if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def hf_model(ref_dir: Path, dtype: torch.dtype):
    from transformers import DeepseekV3ForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV3ForCausalLM.from_pretrained(str(ref_dir), dtype=dtype, attn_implementation="eager",
                                                      experts_implementation="eager")
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


class simulated_fp8_activations:
    """Within this context, every bf16 F.linear except the output head quantizes its input per token
    per 128 channels to FP8 and back (router logits are fp32 in transformers, the head stays bf16):
    what an FP8-GEMM engine feeds its weights. The quantization is written out here, not dsv3's."""

    def __init__(self, model, fp8_dtype: torch.dtype = torch.float8_e4m3fn, fp8_max: float = 448.0,
                 ue8m0: bool = False):
        self.head, self.dtype, self.max, self.ue8m0 = model.lm_head.weight, fp8_dtype, fp8_max, ue8m0

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        pad = (-k) % 128
        blocks = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, 128))
        scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-4) / self.max
        if self.ue8m0:  # V3.1: the scale rounded up to a power of two
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
        q = (blocks / scale).clamp(-self.max, self.max).to(self.dtype).float() * scale
        return q.flatten(-2)[..., :k].to(x.dtype)

    def __enter__(self):
        self.original = torch.nn.functional.linear

        def linear(x, w, b=None):
            if x.dtype == torch.bfloat16 and w is not self.head:
                x = self.quantize(x)
            return self.original(x, w, b)

        torch.nn.functional.linear = linear
        return self

    def __exit__(self, *exc):
        torch.nn.functional.linear = self.original
