"""The MTP module against an independent computation: transformers' own decoder layer for the
block, the reference's formulas written out for the rest."""

from __future__ import annotations

import json

import torch
from reference import hf_model, read_dequantized

import dsv3


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_mtp_matches_independent_computation(tiny_ckpts, hf_refs):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
    )

    ckpt = tiny_ckpts["v3ish"]
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop("quantization_config")
    L, eps = raw["num_hidden_layers"], raw["rms_norm_eps"]
    state = read_dequantized(ckpt)
    p = f"model.layers.{L}."
    mtp = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}

    hf = hf_model(hf_refs["v3ish"], torch.float32)
    hfcfg = hf.config
    layer = DeepseekV3DecoderLayer(hfcfg, layer_idx=L).eval()
    n_exp = raw["n_routed_experts"]
    block = {k: v for k, v in mtp.items() if k.startswith(("self_attn.", "input_layernorm", "post_attention_layernorm",
                                                            "mlp.gate.", "mlp.shared_experts."))}
    block["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([mtp[f"mlp.experts.{e}.gate_proj.weight"], mtp[f"mlp.experts.{e}.up_proj.weight"]]) for e in range(n_exp)])
    block["mlp.experts.down_proj"] = torch.stack([mtp[f"mlp.experts.{e}.down_proj.weight"] for e in range(n_exp)])
    missing, unexpected = layer.load_state_dict(block, strict=False)
    assert not unexpected and not missing, (missing, unexpected)

    ids = torch.randint(0, raw["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(5))
    S = ids.shape[1] - 1
    with torch.inference_mode():
        hidden = hf.model(ids).last_hidden_state[:, :-1]  # main model's final (normed) hidden state
        e = rms(state["model.embed_tokens.weight"][ids[:, 1:]], mtp["enorm.weight"], eps)
        h = rms(hidden, mtp["hnorm.weight"], eps)
        x = torch.cat([e, h], dim=-1) @ mtp["eh_proj.weight"].T
        pos = torch.arange(S)[None]
        cos, sin = hf.model.rotary_emb(x, pos)
        mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        expected = rms(x, mtp["shared_head.norm.weight"], eps) @ mtp["shared_head.head.weight"].T

    got = dsv3.load(ckpt, backend="cpu", dtype="fp32").mtp_logits(ids)
    err = ((got - expected).norm() / expected.norm()).item()
    assert err <= 1e-4, f"MTP logits rel err {err:.3e}"


def test_mtp_uses_the_mtp_weights(tiny_ckpts):
    """Sanity: MTP drafts differ from the main model's next-token logits (it is another module)."""
    engine = dsv3.load(tiny_ckpts["v3ish"], backend="cpu", dtype="fp32")
    ids = torch.randint(0, 384, (1, 9), generator=torch.Generator().manual_seed(1))
    assert engine.has_mtp
    assert not torch.allclose(engine.mtp_logits(ids), engine.logits(ids)[:, 1:])
