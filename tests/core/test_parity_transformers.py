"""dsv3 (cpu) against transformers' DeepseekV3ForCausalLM on the same released-format weights."""

from __future__ import annotations

import pytest
import torch

import dsv3
from reference import hf_logits, hf_model
from tiny_configs import CONFIGS


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def miss_rate(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.argmax(-1) != ref.argmax(-1)).float().mean().item()


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
    e_ours, e_peer = rel_err(ours, ref), rel_err(peer, ref)
    m_ours, m_peer = miss_rate(ours, ref), miss_rate(peer, ref)
    n = ids.numel()
    assert e_ours <= 1.5 * e_peer, f"{name}: bf16 rel err {e_ours:.3e} vs transformers bf16 {e_peer:.3e}"
    # a miss rate is counted in whole positions: allow the peer's rate x1.5, rounded up to a position
    assert m_ours <= max(1.5 * m_peer, 1 / n) + 1e-9, f"{name}: top-1 miss {m_ours:.4f} vs transformers {m_peer:.4f}"
