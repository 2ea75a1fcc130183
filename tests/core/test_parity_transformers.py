"""dsv3 (cpu) against transformers' DeepseekV3ForCausalLM on the same released-format weights."""

from __future__ import annotations

import pytest
import torch
from judge import assert_no_worse, rel_err
from reference import hf_logits, hf_model
from tiny_configs import CONFIGS

import dsv3


def tokens(vocab: int, batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attn", ["naive", "absorb"])
def test_fp32_logits_match_transformers(name, attn, tiny_ckpts, hf_refs):
    ids = tokens(CONFIGS[name]["vocab_size"], 2, 37)
    ref = hf_logits(hf_model(hf_refs[name], torch.float32), ids)
    engine = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="fp32", attn_impl=attn)
    got = engine.logits(ids)
    err = rel_err(got, ref)
    assert got.shape == ref.shape
    assert err <= 1e-4, f"{name}/{attn}: relative error {err:.3e} > 1e-4 (max abs {(got - ref).abs().max():.3e})"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_no_worse_than_transformers_bf16(name, tiny_ckpts, hf_refs):
    ids = tokens(CONFIGS[name]["vocab_size"], 4, 64, seed=1)  # 256 positions
    ref = hf_logits(hf_model(hf_refs[name], torch.float32), ids)
    peer = hf_logits(hf_model(hf_refs[name], torch.bfloat16), ids)
    ours = dsv3.load(tiny_ckpts[name], backend="cpu", dtype="bf16").logits(ids)
    assert_no_worse(ours, peer, ref, f"cpu/{name}")
