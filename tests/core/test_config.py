from __future__ import annotations

import json
import math

import pytest

from dsv3.core.config import ModelConfig
from dsv3.core.errors import ConfigError
from dsv3.synthetic.checkpoint import DEMO

RELEASED_ROPE = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                 "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_released_and_transformers5_rope_forms_agree():
    released = ModelConfig.from_dict({**DEMO, "rope_scaling": RELEASED_ROPE, "rope_theta": 10000})
    tf5 = {k: v for k, v in DEMO.items() if k not in ("rope_scaling", "rope_theta")}
    tf5["rope_parameters"] = {**{k: v for k, v in RELEASED_ROPE.items() if k != "type"},
                              "rope_type": "yarn", "rope_theta": 10000}
    assert ModelConfig.from_dict(tf5) == released
    assert released.yarn.factor == 40 and released.rope_theta == 10000


def test_softmax_scale_includes_mscale_squared():
    cfg = ModelConfig.from_dict({**DEMO, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64})
    m = 0.1 * math.log(40) + 1
    assert abs(m - 1.3689) < 1e-4
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * m * m)


def test_quantization_config_is_read():
    cfg = ModelConfig.from_dict({**DEMO, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                  "weight_block_size": [128, 128],
                                                                  "activation_scheme": "dynamic",
                                                                  "scale_fmt": "ue8m0"}})
    assert cfg.is_fp8 and cfg.quant.scale_fmt == "ue8m0"
    assert not ModelConfig.from_dict(DEMO).is_fp8


@pytest.mark.parametrize("change,field", [
    ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts"),
    ({"topk_group": 5}, "topk_group"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]}}, "weight_block_size"),
])
def test_bad_fields_are_named(change, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict({**DEMO, **change})


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(DEMO))
    assert ModelConfig.from_file(tmp_path).hidden_size == DEMO["hidden_size"]
