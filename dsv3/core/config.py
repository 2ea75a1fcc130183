"""ModelConfig: the model's shape and hyper-parameters, read from a checkpoint's config.json.

Two forms exist in the wild: the released one (`rope_scaling` with `type`) and the one
transformers 5 writes (`rope_parameters` with `rope_type`, `rope_theta` inside it). Both are
accepted. Every inconsistency is a ConfigError naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


@dataclass(frozen=True)
class YarnConfig:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    quant_method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    scale_fmt: str | None = None  # "ue8m0" in V3.1: activation scales rounded up to a power of two


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a plain wq projection (V2-Lite)
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    yarn: YarnConfig | None = None
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    quant: QuantConfig | None = None
    model_type: str = "deepseek_v3"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times m² under YaRN (m from mscale_all_dim): forgetting m² is a classic port bug."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim and self.yarn.factor > 1:
            m = 0.1 * self.yarn.mscale_all_dim * math.log(self.yarn.factor) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def is_fp8(self) -> bool:
        return self.quant is not None and self.quant.quant_method == "fp8"

    # ---- reading ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (DeepSeek-V3, V3-0324, R1, V3.1 checkpoints)"
            )
        required = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        ]
        for name in required:
            if d.get(name) is None:
                raise ConfigError(f"config.json: required field {name!r} is missing; the checkpoint's config is incomplete")
        if d.get("n_routed_experts") and d.get("moe_intermediate_size") is None:
            raise ConfigError("config.json: n_routed_experts is set but moe_intermediate_size is missing")

        theta, yarn = _read_rope(d)
        quant = _read_quant(d.get("quantization_config"))
        known = {f.name for f in fields(cls)}
        for f in fields(cls):
            if d.get(f.name) is not None and f.name not in ("yarn", "quant", "raw"):
                _check_type(f.name, f.type, d[f.name])
        optional = {f.name for f in fields(cls) if "None" in str(f.type)}
        kw = {k: v for k, v in d.items() if k in known and k not in ("yarn", "quant", "raw", "rope_theta")
              and (v is not None or k in optional)}  # null means "the default" for the others
        kw.setdefault("moe_intermediate_size", 0)
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        for k in ("n_group", "topk_group", "first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
            if kw.get(k) is None:
                kw.pop(k, None)
        if kw.get("torch_dtype") is None:
            kw["torch_dtype"] = d.get("dtype") or "bfloat16"
        cfg = cls(**kw, rope_theta=theta, yarn=yarn, quant=quant, raw=d)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; point at a checkpoint directory (config.json + *.safetensors)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); re-download or restore the file") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(d).__name__}")
        return cls.from_dict(d)

    def validate(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"config.json: {name}={getattr(self, name)!r} {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise bad(name, "must be a positive integer")
        for name in ("qk_nope_head_dim", "n_shared_experts", "n_routed_experts", "moe_intermediate_size"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if not self.rms_norm_eps > 0:
            raise bad("rms_norm_eps", "must be positive")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (rotary pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise bad("q_lora_rank", "must be positive or null")
        if self.n_routed_experts:
            if self.num_experts_per_tok <= 0 or self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                raise bad("n_routed_experts", f"is not divisible by n_group={self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must be in 1..n_group={self.n_group}")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise bad("n_group", "leaves fewer than 2 experts per group; noaux_tc scores a group by its top 2")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                raise bad("num_experts_per_tok", "exceeds the experts in the topk_group kept groups")
            if self.scoring_func not in SCORING_FUNCS:
                raise bad("scoring_func", f"is not one of {SCORING_FUNCS}")
            if self.topk_method not in TOPK_METHODS:
                raise bad("topk_method", f"is not one of {TOPK_METHODS}")
            if self.moe_intermediate_size <= 0:
                raise bad("moe_intermediate_size", "must be positive for a MoE model")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"must be in 0..num_hidden_layers={self.num_hidden_layers}")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", "must be >= 0")
        if self.num_nextn_predict_layers and not self.n_routed_experts:
            raise bad("num_nextn_predict_layers", "needs a MoE model (the MTP block is a MoE block)")
        if self.quant is not None:
            if self.quant.quant_method != "fp8" or self.quant.fmt != "e4m3":
                raise ConfigError(
                    f"config.json: quantization_config {self.quant.quant_method}/{self.quant.fmt} is not supported; "
                    "expected fp8/e4m3 (the released format) or no quantization_config (BF16)"
                )
            if tuple(self.quant.weight_block_size) != (128, 128):
                raise ConfigError(
                    f"config.json: quantization_config.weight_block_size={list(self.quant.weight_block_size)} "
                    "is not supported; expected [128, 128]"
                )


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """A field's JSON value against its annotation ('int', 'float | None', 'int | list[int] | None', ...)."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return
    for opt in options:
        if opt == "list[int]" and isinstance(value, list) and all(_is(v, "int") for v in value):
            return
        if opt in _TYPES and _is(value, opt):
            return
    want = " or ".join("a list of integers" if o == "list[int]" else "null" if o == "None" else
                       {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}.get(o, o)
                       for o in options)
    raise ConfigError(f"config.json: {name}={value!r} must be {want}")


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind != "bool":
        return False
    if kind == "float" and isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, _TYPES[kind])


def _number(where: str, value: Any) -> float:
    if not _is(value, "float"):
        raise ConfigError(f"config.json: {where}={value!r} must be a finite number")
    return float(value)


def _read_rope(d: dict) -> tuple[float, YarnConfig | None]:
    """Both `rope_scaling: {type}` (released) and `rope_parameters: {rope_type, rope_theta}` (transformers 5)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object or null, found {params!r}")
    theta = _number("rope_theta", params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "yarn":
        raise ConfigError(f"config.json: rope type {kind!r} is not supported; expected 'yarn' or none")
    for k in ("factor", "original_max_position_embeddings"):
        if params.get(k) is None:
            raise ConfigError(f"config.json: rope_scaling.{k} is required for yarn")
    if not _is(params["original_max_position_embeddings"], "int") or params["original_max_position_embeddings"] <= 0:
        raise ConfigError(f"config.json: rope_scaling.original_max_position_embeddings="
                          f"{params['original_max_position_embeddings']!r} must be a positive integer")

    def num(k: str, default: float) -> float:
        return _number(f"rope_scaling.{k}", params.get(k, default) if params.get(k) is not None else default)

    yarn = YarnConfig(
        factor=num("factor", 1), original_max_position_embeddings=params["original_max_position_embeddings"],
        beta_fast=num("beta_fast", 32), beta_slow=num("beta_slow", 1),
        mscale=num("mscale", 1) or 1.0, mscale_all_dim=num("mscale_all_dim", 0),
    )
    if yarn.factor <= 0:
        raise ConfigError(f"config.json: rope_scaling.factor={yarn.factor} must be positive")
    return theta, yarn


def _read_quant(q: Any) -> QuantConfig | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"config.json: quantization_config must be an object, found {q!r}")
    block = q.get("weight_block_size", [128, 128])
    if not isinstance(block, list) or not all(_is(b, "int") for b in block):
        raise ConfigError(f"config.json: quantization_config.weight_block_size={block!r} must be a list of integers")
    for k in ("quant_method", "fmt", "activation_scheme", "scale_fmt"):
        if q.get(k) is not None and not isinstance(q[k], str):
            raise ConfigError(f"config.json: quantization_config.{k}={q[k]!r} must be a string")
    if q.get("scale_fmt") not in (None, "ue8m0"):
        raise ConfigError(f"config.json: quantization_config.scale_fmt={q['scale_fmt']!r} is not supported; expected "
                          "ue8m0 or none")
    return QuantConfig(
        quant_method=q.get("quant_method", "fp8"),
        fmt=q.get("fmt", "e4m3"),
        weight_block_size=tuple(block),
        activation_scheme=q.get("activation_scheme", "dynamic"),
        scale_fmt=q.get("scale_fmt"),
    )
