"""The name tables: known pairs from the official demo's layout, and round trips over every name."""

from __future__ import annotations

import pytest
from tiny_configs import CONFIGS

from dsv3.core import names as N
from dsv3.core.config import ModelConfig

KNOWN = [  # HF name, demo name, split dim
    ("model.embed_tokens.weight", "embed.weight", 0),
    ("lm_head.weight", "head.weight", 0),
    ("model.norm.weight", "norm.weight", None),
    ("model.layers.0.input_layernorm.weight", "layers.0.attn_norm.weight", None),
    ("model.layers.0.post_attention_layernorm.weight", "layers.0.ffn_norm.weight", None),
    ("model.layers.0.self_attn.q_a_proj.weight", "layers.0.attn.wq_a.weight", None),
    ("model.layers.0.self_attn.q_a_layernorm.weight", "layers.0.attn.q_norm.weight", None),
    ("model.layers.0.self_attn.q_b_proj.weight_scale_inv", "layers.0.attn.wq_b.scale", 0),
    ("model.layers.1.self_attn.q_proj.weight", "layers.1.attn.wq.weight", 0),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "layers.0.attn.wkv_a.weight", None),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", "layers.0.attn.kv_norm.weight", None),
    ("model.layers.0.self_attn.kv_b_proj.weight", "layers.0.attn.wkv_b.weight", 0),
    ("model.layers.0.self_attn.o_proj.weight", "layers.0.attn.wo.weight", 1),
    ("model.layers.0.mlp.gate_proj.weight", "layers.0.ffn.w1.weight", 0),
    ("model.layers.0.mlp.down_proj.weight", "layers.0.ffn.w2.weight", 1),
    ("model.layers.0.mlp.up_proj.weight", "layers.0.ffn.w3.weight", 0),
    ("model.layers.3.mlp.gate.weight", "layers.3.ffn.gate.weight", None),
    ("model.layers.3.mlp.gate.e_score_correction_bias", "layers.3.ffn.gate.bias", None),
    ("model.layers.3.mlp.experts.17.down_proj.weight_scale_inv", "layers.3.ffn.experts.17.w2.scale", None),
    ("model.layers.3.mlp.shared_experts.down_proj.weight", "layers.3.ffn.shared_experts.w2.weight", 1),
    ("model.layers.61.shared_head.head.weight", "layers.61.shared_head.head.weight", 0),
    ("model.layers.61.eh_proj.weight", "layers.61.eh_proj.weight", None),
]


@pytest.mark.parametrize("hf,demo,dim", KNOWN)
def test_known_pairs(hf, demo, dim):
    assert N.hf_to_demo(hf) == demo
    assert N.demo_to_hf(demo) == hf
    assert N.split_dim(demo) == dim


def test_model_names_for_experts_and_mtp():
    assert N.demo_to_model("layers.3.ffn.experts.17.w1.weight", 61) == ("layers.3.ffn.experts.w1.weight", 17)
    assert N.demo_to_model("layers.61.enorm.weight", 61) == ("mtp.0.enorm.weight", None)
    assert N.demo_to_model("layers.61.shared_head.norm.weight", 61) == ("mtp.0.head_norm.weight", None)
    assert N.demo_to_model("layers.61.attn.wq_a.scale", 61) == ("mtp.0.block.attn.wq_a.scale", None)
    assert N.demo_to_model("layers.61.embed.weight", 61) is None
    assert N.demo_to_model("layers.61.shared_head.head.weight", 61) is None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_expected_name_round_trips(name):
    cfg = ModelConfig.from_dict({**CONFIGS[name], "quantization_config": {"quant_method": "fp8"}})
    for hf in N.expected_hf_tensors(cfg):
        assert N.demo_to_hf(N.hf_to_demo(hf)) == hf


def test_unknown_names_are_rejected():
    with pytest.raises(N.UnknownTensor):
        N.hf_to_demo("model.layers.0.self_attn.rotary_emb.inv_freq")
