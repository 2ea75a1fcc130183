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
