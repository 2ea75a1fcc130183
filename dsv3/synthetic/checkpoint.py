"""Random checkpoints in the released layout: config, index, several shards, FP8 block scales, MTP.

This is the embedded default the README runs on and the fixture the tests load with both dsv3
and transformers. Every tensor is drawn from a generator seeded by its name, so any subset can
be regenerated independently and the same (config, seed) always gives the same bytes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from ..core import fp8 as F8
from ..core.checkpoint import INDEX
from ..core.config import ModelConfig
from ..core.names import TensorSpec, expected_hf_tensors
from ..core.safetensors_io import save_file
from .tokenizer import write_tokenizer

QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}

_BASE = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "n_shared_experts": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "hidden_act": "silu",
    "moe_layer_freq": 1,
    "attention_bias": False,
}

#: the README's default: small enough to run in seconds on two cores
DEMO = {**_BASE, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 384, "moe_intermediate_size": 96,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "max_position_embeddings": 2048}

#: the ~280M-parameter benchmark model of issue 2
BENCH_280M = {**_BASE, "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
              "moe_intermediate_size": 256, "num_hidden_layers": 8, "first_k_dense_replace": 1,
              "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 384, "kv_lora_rank": 256,
              "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 32,
              "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "max_position_embeddings": 4096}


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed((zlib.crc32(name.encode()) << 16) ^ seed)


def _canonical(name: str, n_layers: int) -> str:
    """MTP's copies of the embedding and head draw the main model's values, as in the release."""
    if name.endswith(".embed_tokens.weight") and name.startswith("model.layers."):
        return "model.embed_tokens.weight"
    if name.endswith(".shared_head.head.weight"):
        return "lm_head.weight"
    return name


def random_tensor(name: str, spec: TensorSpec, seed: int) -> torch.Tensor:
    """fp32 values for one tensor; scales of linear layers are derived, not drawn."""
    g = _generator(name, seed)
    shape = spec.shape
    if spec.role == "linear":
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5
    if spec.role == "embed":
        std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
        return torch.randn(shape, generator=g) * std
    if spec.role == "norm":
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if spec.role == "gate":
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5
    if spec.role == "bias":  # negative values too: they expose 0-instead-of--inf group masking
        return (torch.rand(shape, generator=g) - 0.5) * 0.6
    raise ValueError(f"no random init for role {spec.role}")


def stored_tensors(name: str, spec: TensorSpec, specs: dict[str, TensorSpec], seed: int, fp8: bool,
                   n_layers: int, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensor(s) as they sit on disk: an FP8 weight comes with its block scale. `overrides` gives the fp32
    values of some tensors (a trained MTP layer) instead of random ones."""
    src = _canonical(name, n_layers)
    if overrides and name in overrides:
        values = overrides[name].float()
    else:
        values = random_tensor(src, specs.get(src, spec), seed)
    if spec.role == "linear" and fp8:
        q, s = F8.quantize(values)
        return {name: q, name.replace(".weight", ".weight_scale_inv"): s}
    if spec.role in ("bias",):
        return {name: values.float()}
    return {name: values.to(torch.bfloat16)}


def write_checkpoint(dst: str | Path, config: dict | None = None, seed: int = 0, n_shards: int = 4,
                     fp8: bool = True, tokenizer: bool = True, progress=None,
                     overrides: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a random checkpoint in the released HF layout (FP8 by default) to dst."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = dict(DEMO if config is None else config)
    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = dict(QUANT)
    cfg = ModelConfig.from_dict(config)
    specs = expected_hf_tensors(cfg, fp8=fp8)
    weights = [n for n, s in specs.items() if s.role != "scale"]

    # contiguous chunks of similar byte size; every third scale is pushed into the next shard so
    # readers must go through the index (as in the release, where this happens at shard edges)
    sizes = [_numel(specs[n].shape) for n in weights]
    total, acc, shard_of = sum(sizes), 0, {}
    for n, size in zip(weights, sizes):
        shard_of[n] = min(n_shards - 1, acc * n_shards // max(total, 1))
        acc += size
    placement: dict[str, int] = {}
    k = 0
    for n in weights:
        placement[n] = shard_of[n]
        sname = n.replace(".weight", ".weight_scale_inv")
        if sname in specs:
            k += 1
            placement[sname] = (shard_of[n] + (1 if k % 3 == 0 else 0)) % n_shards
    weight_map, total_size = {}, 0
    for shard in range(n_shards):
        fname = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for n in weights:
            wanted = [t for t in (n, n.replace(".weight", ".weight_scale_inv")) if placement.get(t) == shard]
            if not wanted:
                continue
            stored = stored_tensors(n, specs[n], specs, seed, fp8, cfg.num_hidden_layers, overrides)
            for t in wanted:
                tensors[t] = stored[t]
        save_file(tensors, dst / fname, {"format": "pt"})
        for t, v in tensors.items():
            weight_map[t] = fname
            total_size += v.numel() * v.element_size()
        if progress is not None:
            progress(shard + 1, n_shards)
    (dst / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    if tokenizer:
        write_tokenizer(dst, vocab_size=min(cfg.vocab_size, 4096))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
         "temperature": 0.6, "top_p": 0.95}, indent=2))
    return dst


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
