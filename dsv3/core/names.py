"""Tensor names: checkpoint (HF) <-> official demo (model-parallel files) <-> this model, as data.

HF:    model.layers.3.self_attn.q_b_proj.weight_scale_inv
demo:  layers.3.attn.wq_b.scale                        (split along dim 0 over ranks)
ours:  layers.3.attn.wq_b.scale                        (same as demo, except stacked experts and MTP)

Experts: demo `layers.3.ffn.experts.17.w1.weight` is slot 17 - first of our stacked
`layers.3.ffn.experts.w1.weight`. MTP: HF `model.layers.{L+j}.*` keeps the demo renaming in the
mtp rank files and becomes `mtp.{j}.*` here (the block's tensors under `mtp.{j}.block.`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig
from .fp8 import scale_shape

#: HF module name (second-to-last part) -> (demo name, split dim over ranks or None = replicated)
MODULES: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
    # MTP-only modules (the demo drops them; our mtp rank files keep the same rules)
    "enorm": ("enorm", None),
    "hnorm": ("hnorm", None),
    "eh_proj": ("eh_proj", None),
    "head": ("head", 0),
}
#: path components renamed anywhere in the name
PATH = {"self_attn": "attn", "mlp": "ffn"}
#: the last component
LEAF = {"weight": "weight", "weight_scale_inv": "scale", "e_score_correction_bias": "bias"}

_DEMO_MODULES = {demo: dim for demo, dim in MODULES.values()}
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.(weight|scale)$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


class UnknownTensor(KeyError):
    pass


def hf_to_demo(name: str) -> str:
    parts = name.removeprefix("model.").split(".")
    if len(parts) < 2 or parts[-1] not in LEAF or parts[-2] not in MODULES:
        raise UnknownTensor(name)
    parts = [PATH.get(p, p) for p in parts[:-2]] + [MODULES[parts[-2]][0], LEAF[parts[-1]]]
    return ".".join(parts)


def demo_to_hf(name: str) -> str:
    inv_modules = {demo: hf for hf, (demo, _) in MODULES.items() if hf != "head"}
    inv_path = {v: k for k, v in PATH.items()}
    inv_leaf = {v: k for k, v in LEAF.items()}
    parts = name.split(".")
    module = parts[-2]
    if module == "head" and len(parts) > 2:  # MTP shared_head.head
        hf_module = "head"
    else:
        hf_module = inv_modules[module]
    out = [inv_path.get(p, p) for p in parts[:-2]] + [hf_module, inv_leaf[parts[-1]]]
    prefix = "" if hf_module == "lm_head" else "model."
    return prefix + ".".join(out)


def split_dim(demo_name: str) -> int | None:
    """The dim a tensor is split along over ranks (experts are placed whole: None)."""
    if _EXPERT.match(demo_name):
        return None
    dim = _DEMO_MODULES[demo_name.split(".")[-2]]
    if demo_name.endswith(".bias"):  # the gate's correction bias is replicated like the gate
        return None
    return dim


def expert_id(demo_name: str) -> int | None:
    m = _EXPERT.match(demo_name)
    return int(m.group(2)) if m else None


def demo_to_model(demo_name: str, n_layers: int) -> tuple[str, int | None] | None:
    """Our buffer name and expert slot (global id) for a demo name; None for MTP's aliases of embed/head."""
    m = _EXPERT.match(demo_name)
    expert = None
    if m:
        demo_name, expert = f"{m.group(1)}.{m.group(3)}.{m.group(4)}", int(m.group(2))
    lm = _LAYER.match(demo_name)
    if lm is None or int(lm.group(1)) < n_layers:
        return demo_name, expert
    j, rest = int(lm.group(1)) - n_layers, lm.group(2)
    if rest.startswith(("embed.", "shared_head.head.")):
        return None  # copies of the main embedding / head: the main model's are used
    if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
        return f"mtp.{j}.{rest}", expert
    if rest.startswith("shared_head.norm."):
        return f"mtp.{j}.head_norm.{rest.split('.')[-1]}", expert
    return f"mtp.{j}.block.{rest}", expert


# ---- what a config implies -------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    role: str  # "linear" (FP8 in the released format), "scale", "embed", "norm", "gate", "bias"


def expected_hf_tensors(cfg: ModelConfig, fp8: bool | None = None, with_mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor name and shape the released (HF) layout has for this config."""
    fp8 = cfg.is_fp8 if fp8 is None else fp8
    out: dict[str, TensorSpec] = {}
    D, V = cfg.hidden_size, cfg.vocab_size
    H, qk = cfg.num_attention_heads, cfg.qk_head_dim

    def linear(name: str, n: int, k: int) -> None:
        out[f"{name}.weight"] = TensorSpec((n, k), "linear")
        if fp8:
            out[f"{name}.weight_scale_inv"] = TensorSpec(scale_shape((n, k)), "scale")

    def mlp(p: str, inter: int) -> None:
        linear(f"{p}.gate_proj", inter, D)
        linear(f"{p}.up_proj", inter, D)
        linear(f"{p}.down_proj", D, inter)

    out["model.embed_tokens.weight"] = TensorSpec((V, D), "embed")
    out["model.norm.weight"] = TensorSpec((D,), "norm")
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = TensorSpec((V, D), "embed")
    n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
    for i in range(cfg.num_hidden_layers + n_mtp):
        p = f"model.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = TensorSpec((D,), "norm")
        out[f"{p}.post_attention_layernorm.weight"] = TensorSpec((D,), "norm")
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            linear(f"{a}.q_proj", H * qk, D)
        else:
            linear(f"{a}.q_a_proj", cfg.q_lora_rank, D)
            out[f"{a}.q_a_layernorm.weight"] = TensorSpec((cfg.q_lora_rank,), "norm")
            linear(f"{a}.q_b_proj", H * qk, cfg.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
        out[f"{a}.kv_a_layernorm.weight"] = TensorSpec((cfg.kv_lora_rank,), "norm")
        linear(f"{a}.kv_b_proj", H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(f"{a}.o_proj", D, H * cfg.v_head_dim)
        if cfg.is_moe_layer(i):
            out[f"{p}.mlp.gate.weight"] = TensorSpec((cfg.n_routed_experts, D), "gate")
            if cfg.topk_method == "noaux_tc":
                out[f"{p}.mlp.gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), "bias")
            for e in range(cfg.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
            if cfg.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", cfg.n_shared_experts * cfg.moe_intermediate_size)
        else:
            mlp(f"{p}.mlp", cfg.intermediate_size)
        if i >= cfg.num_hidden_layers:
            out[f"{p}.embed_tokens.weight"] = TensorSpec((V, D), "embed")
            out[f"{p}.enorm.weight"] = TensorSpec((D,), "norm")
            out[f"{p}.hnorm.weight"] = TensorSpec((D,), "norm")
            linear(f"{p}.eh_proj", D, 2 * D)
            out[f"{p}.shared_head.norm.weight"] = TensorSpec((D,), "norm")
            out[f"{p}.shared_head.head.weight"] = TensorSpec((V, D), "embed")
    return out
