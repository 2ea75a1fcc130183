"""Conversion round trips, tensor by tensor, against independent few-line computations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reference import hf_logits, hf_model, read_dequantized
from safetensors import safe_open
from tiny_configs import ALIGNED

import dsv3
from dsv3.cli import main
from dsv3.synthetic import write_checkpoint
from dsv3.synthetic.checkpoint import DEMO


def dsv3_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("aligned"), ALIGNED, seed=4, n_shards=3)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dequant_equals_exact_product_rounded_once(demo_ckpt, tmp_path, dtype, torch_dtype):
    dst = tmp_path / "out"
    r = dsv3_cli("convert", "dequant", demo_ckpt, dst, "--dtype", dtype, "--quiet")
    assert r.exit_code == 0, r.output
    exact = read_dequantized(demo_ckpt)  # fp32 products, computed independently
    src = tensors(demo_ckpt)
    got = tensors(dst)
    assert set(got) == set(exact)
    for name, t in got.items():
        if src[name].dtype == torch.float8_e4m3fn:
            assert t.dtype == torch_dtype and torch.equal(t, exact[name].to(torch_dtype)), name
        else:
            assert t.dtype == src[name].dtype and torch.equal(t, src[name]), name
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (demo_ckpt / f).read_bytes()


def test_transformers_loads_dequant_output(demo_ckpt, tmp_path):
    dst = tmp_path / "bf16"
    assert dsv3_cli("convert", "dequant", demo_ckpt, dst, "--dtype", "fp32", "--quiet").exit_code == 0
    model = hf_model(dst, torch.float32)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(model, ids)
    got = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32").logits(ids)
    assert ((got - ref).norm() / ref.norm()) < 1e-4


def demo_convert_reference(src: dict[str, torch.Tensor], n_layers: int, n_experts: int, mp: int, rank: int):
    """The official demo's convert.py rules, written out: rename, drop layer n_layers, split or place."""
    mapping = {"embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
               "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
               "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
               "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1),
               "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0),
               "norm": ("norm", None), "lm_head": ("head", 0), "scale": ("scale", None)}
    out = {}
    per = n_experts // mp
    for name, t in src.items():
        if f"model.layers.{n_layers}" in name:
            continue
        name = name.removeprefix("model.")
        name = name.replace("self_attn", "attn").replace("mlp", "ffn")
        name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
        key = name.split(".")[-2]
        new, dim = mapping[key]
        name = name.replace(key, new)
        if "experts" in name and "shared_experts" not in name:
            idx = int(name.split(".")[-3])
            if not rank * per <= idx < (rank + 1) * per:
                continue
        elif dim is not None:
            n = t.size(dim) // mp
            t = t.narrow(dim, rank * n, n).contiguous()
        out[name] = t
    return out


@pytest.mark.parametrize("mp", [1, 2, 4])
def test_reshard_matches_demo_rules_and_reassembles(aligned, tmp_path, mp):
    dst = tmp_path / f"mp{mp}"
    r = dsv3_cli("convert", "reshard", aligned, dst, "--model-parallel", mp, "--quiet")
    assert r.exit_code == 0, r.output
    src = tensors(aligned)
    L, E = ALIGNED["num_hidden_layers"], ALIGNED["n_routed_experts"]
    for rank in range(mp):
        with safe_open(str(dst / f"model{rank}-mp{mp}.safetensors"), "pt") as h:
            got = {k: h.get_tensor(k) for k in h.keys()}
        ref = demo_convert_reference(src, L, E, mp, rank)
        assert set(got) == set(ref)
        for k in ref:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
        assert (dst / f"mtp{rank}-mp{mp}.safetensors").is_file()
    # reassemble: the same logits from rank files as from the HF layout
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    a = dsv3.load(aligned, backend="cpu", dtype="fp32")
    b = dsv3.load(dst, backend="cpu", dtype="fp32")
    assert b.has_mtp
    torch.testing.assert_close(b.logits(ids), a.logits(ids), rtol=0, atol=0)
    torch.testing.assert_close(b.mtp_logits(ids), a.mtp_logits(ids), rtol=0, atol=0)


def test_reshard_bf16_and_errors(demo_ckpt, tmp_path):
    r = dsv3_cli("convert", "reshard", demo_ckpt, tmp_path / "x", "--model-parallel", "2")
    assert r.exit_code != 0 and "cuts through 128x128 scale blocks" in r.stderr and "down_proj" in r.stderr
    assert not (tmp_path / "x").exists()
    r = dsv3_cli("convert", "reshard", demo_ckpt, tmp_path / "x", "--model-parallel", "3")
    assert r.exit_code != 0 and "is not divisible by --model-parallel 3" in r.stderr
    r = dsv3_cli("convert", "reshard", demo_ckpt, tmp_path / "b", "--model-parallel", "2", "--dtype", "bf16", "--quiet")
    assert r.exit_code == 0, r.output
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    ref = dsv3.load(demo_ckpt, backend="cpu", dtype="bf16", cpu_weights="bf16").logits(ids)  # dequantized at load
    torch.testing.assert_close(dsv3.load(tmp_path / "b", backend="cpu", dtype="bf16").logits(ids), ref)


def test_fnuz_all_256_bytes():
    from dsv3.core.fp8 import fn_to_fnuz

    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    fn = raw.view(torch.float8_e4m3fn)
    nan = fn.float().isnan()
    assert sorted(raw[nan].tolist()) == [0x7F, 0xFF]
    with pytest.raises(ValueError, match="NaN"):
        fn_to_fnuz(fn.view(1, 256), torch.ones(1, 1))
    ok = fn[~nan].view(1, -1)
    fnuz, scale = fn_to_fnuz(ok, torch.ones(1, 1))
    assert fnuz.dtype == torch.float8_e4m3fnuz and scale.item() == 2.0
    real_fn, real_fnuz = ok.float(), fnuz.float() * scale
    assert not real_fnuz.isnan().any()
    assert torch.equal(real_fn.abs(), real_fnuz.abs())
    assert torch.equal(real_fn, real_fnuz)  # -0 == 0 in float comparison; check the byte explicitly:
    assert fnuz.view(torch.uint8)[ok.view(torch.uint8) == 0x80].tolist() == [0]


def test_fnuz_checkpoint_dequantizes_to_the_same_reals(demo_ckpt, tmp_path):
    dst = tmp_path / "fnuz"
    assert dsv3_cli("convert", "fnuz", demo_ckpt, dst, "--quiet").exit_code == 0
    src, got = tensors(demo_ckpt), tensors(dst)
    for name, t in src.items():
        if t.dtype == torch.float8_e4m3fn:
            s, s2 = src[name + "_scale_inv"], got[name + "_scale_inv"]
            assert got[name].dtype == torch.float8_e4m3fnuz
            n, k = t.shape
            e = lambda sc: sc.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]  # noqa: E731
            assert torch.equal(t.float() * e(s), got[name].float() * e(s2)), name
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(dsv3.load(dst, backend="cpu", dtype="fp32").logits(ids),
                               dsv3.load(demo_ckpt, backend="cpu", dtype="fp32").logits(ids), rtol=0, atol=0)
    r = dsv3_cli("convert", "fnuz", dst, tmp_path / "again")
    assert r.exit_code != 0 and "no float8_e4m3fn weights" in r.stderr


def test_fnuz_reports_nan_bytes(demo_ckpt, tmp_path):
    ck = tmp_path / "nan"
    shutil.copytree(demo_ckpt, ck)
    _plant(ck, "model.layers.0.self_attn.o_proj.weight", lambda t: _set_byte(t, 0x7F))
    r = dsv3_cli("convert", "fnuz", ck, tmp_path / "out")
    assert r.exit_code != 0 and "NaN bytes" in r.stderr and "o_proj" in r.stderr


def _set_byte(t, value):
    t = t.clone()
    t.view(torch.uint8).view(-1)[5] = value
    return t


def _plant(ck: Path, name: str, change=None, drop: bool = False):
    """Rewrite the shard holding `name` with the tensor changed or dropped (index kept as is)."""
    from safetensors.torch import save_file

    index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    f = ck / index[name]
    with safe_open(str(f), "pt") as h:
        ts = {k: h.get_tensor(k) for k in h.keys()}
    if drop:
        del ts[name]
    else:
        ts[name] = change(ts[name])
    save_file(ts, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("fault,needle", [
    ("nan_scale", "NaN/Inf"),
    ("bad_shape", "shape"),
    ("missing_scale", "is not there"),
    ("missing_shard", "missing shard"),
    ("truncated", "truncated"),
    ("extra", "not list"),
    ("checksum", "sha256 mismatch"),
])
def test_verify_catches_each_planted_fault(demo_ckpt, tmp_path, fault, needle):
    ck = tmp_path / "ck"
    assert dsv3_cli("convert", "dequant", demo_ckpt, tmp_path / "bf", "--quiet").exit_code == 0
    shutil.copytree(demo_ckpt if fault != "checksum" else tmp_path / "bf", ck)
    w = "model.layers.0.self_attn.o_proj.weight"
    index = json.loads((ck / "model.safetensors.index.json").read_text())["weight_map"]
    if fault == "nan_scale":
        _plant(ck, w + "_scale_inv", lambda t: t.fill_(float("nan")))
    elif fault == "bad_shape":
        _plant(ck, "model.norm.weight", lambda t: t[:-1].clone())
    elif fault == "missing_scale":
        _plant(ck, w + "_scale_inv", drop=True)
    elif fault == "missing_shard":
        (ck / index["lm_head.weight"]).unlink()
    elif fault == "truncated":
        p = ck / index[w]
        p.write_bytes(p.read_bytes()[:-10])
    elif fault == "extra":
        _plant(ck, w, lambda t: t)
        from safetensors.torch import save_file
        f = ck / index[w]
        with safe_open(str(f), "pt") as h:
            ts = {k: h.get_tensor(k) for k in h.keys()}
        ts["model.layers.0.extra.weight"] = torch.zeros(2)
        save_file(ts, str(f))
    elif fault == "checksum":  # one mantissa bit of a bf16 weight, in place: same size, still finite
        from dsv3.core.safetensors_io import read_header
        f = ck / index["model.norm.weight"]
        info = read_header(f)[0]["model.norm.weight"]
        raw = bytearray(f.read_bytes())
        raw[info.begin] ^= 1
        f.write_bytes(raw)
    r = dsv3_cli("convert", "verify", ck, *(["--checksums"] if fault == "checksum" else []))
    assert r.exit_code != 0, r.output
    assert needle in r.stderr, r.stderr


def test_verify_clean_checkpoint(demo_ckpt):
    r = dsv3_cli("convert", "verify", demo_ckpt)
    assert r.exit_code == 0, r.output


def test_dst_refused_without_force_and_src_untouched(demo_ckpt, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    r = dsv3_cli("convert", "dequant", demo_ckpt, dst)
    assert r.exit_code != 0 and "--force" in r.stderr and (dst / "keep").exists()
    r = dsv3_cli("convert", "dequant", demo_ckpt, dst, "--force", "--quiet")  # not an earlier output: kept
    assert r.exit_code == 2 and "dsv3-manifest.json" in r.stderr and (dst / "keep").exists()
    (dst / "keep").unlink()
    assert dsv3_cli("convert", "dequant", demo_ckpt, dst, "--quiet").exit_code == 0
    r = dsv3_cli("convert", "dequant", tmp_path / "dst", tmp_path / "again")
    assert r.exit_code != 0 and "no float8_e4m3fn weights" in r.stderr
    r = dsv3_cli("convert", "dequant", demo_ckpt, demo_ckpt / "inside")
    assert r.exit_code != 0 and "SRC" in r.stderr


def test_missing_scale_refused_like_run(demo_ckpt, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _plant(ck, name, drop=True)
    del index["weight_map"][name]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    for cmd in (["convert", "dequant", ck, tmp_path / "o"], ["run", ck, "--prompt", "x"]):
        r = dsv3_cli(*cmd)
        assert r.exit_code == 2 and f"missing scale {name}" in r.stderr, r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


#: runs the CLI with Output.finished patched to die like `kill -9` after N finished files
KILL_AFTER = """
import os, sys
from dsv3.convert import common
finished = common.Output.finished
def dying(self, name, digest=None):
    finished(self, name, digest)
    if len(self.done) >= int(os.environ["KILL_AFTER_FILES"]):
        os._exit(137)
common.Output.finished = dying
from dsv3.cli import main
sys.argv[0] = "dsv3"
main()
"""


def run_killed(args, after: int):
    env = {**os.environ, "KILL_AFTER_FILES": str(after)}
    return subprocess.run([sys.executable, "-c", KILL_AFTER, *map(str, args)], env=env, capture_output=True, text=True)


def test_killed_dequant_resumes_to_identical_output(tmp_path):
    src = write_checkpoint(tmp_path / "src", DEMO, seed=9, n_shards=6)
    cmd = [sys.executable, "-m", "dsv3", "convert", "dequant", str(src), str(tmp_path / "a"), "--quiet"]
    r = run_killed(cmd[3:], 3)
    assert r.returncode == 137, r.stderr
    assert not (tmp_path / "a").exists() and (tmp_path / ".a.partial").is_dir()  # never looks complete
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd[:5], str(src), str(tmp_path / "b"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0
    a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
