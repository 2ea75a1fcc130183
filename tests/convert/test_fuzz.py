"""Seeded random corruption of a checkpoint, through `run`, every `convert` command and `verify`.

Each mutation must end either in success (finite logits: generation refuses NaN/Inf, and a verify
that agrees) or in exit code 2 with one `error:` line naming the file: never a traceback, an
`internal error`, a silent NaN, a modified SRC or a file outside DST.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsv3.cli import main
from dsv3.core.safetensors_io import read_header
from dsv3.synthetic import write_checkpoint
from dsv3.synthetic.checkpoint import DEMO

N_MUTATIONS = 300
INDEX = "model.safetensors.index.json"
#: small enough that one mutation's five commands take ~0.3 s
MICRO = {**DEMO, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
         "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
         "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
         "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}
ODD_VALUES = [None, -1, 0, 1, 3, 2.5, float("nan"), 1e300, "x", "", [], [1, "a"], {}, {"a": 1}, True, 10**15]


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("micro"), MICRO, seed=5, n_shards=3)


def shards(ck: Path) -> list[Path]:
    return sorted(ck.glob("*.safetensors"))


def header_span(f: Path) -> tuple[int, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw


def set_header(f: Path, fn) -> None:
    n, raw = header_span(f)
    header = fn(json.loads(raw[8:8 + n]))
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def edit_json(p: Path, fn) -> None:
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def tensor_bytes(rng: random.Random, ck: Path, want) -> tuple[Path, str, int, int]:
    """A random tensor that `want(name, info)` accepts: (file, name, begin, end)."""
    choices = [(f, n, i) for f in shards(ck) for n, i in read_header(f)[0].items() if want(n, i)]
    f, n, i = rng.choice(choices)
    return f, n, i.begin, i.end


def mutate(rng: random.Random, ck: Path) -> str:
    """Apply one random corruption; returns its description."""
    kind = rng.choice(["header byte", "header length", "config field", "config type", "index entry", "offsets",
                       "dtype/shape", "fp8 bytes", "scale", "truncate", "json not object"])
    f = rng.choice(shards(ck))
    if kind == "header byte":
        n, raw = header_span(f)
        raw = bytearray(raw)
        pos = rng.randrange(8, 8 + n)
        raw[pos] = rng.randrange(256)
        f.write_bytes(raw)
        return f"{kind} {f.name}@{pos}"
    if kind == "header length":
        n, raw = header_span(f)
        new = rng.choice([0, n - 1, n + 1, n * 2, 2**63, rng.randrange(1, n)])
        f.write_bytes(struct.pack("<Q", new % 2**64) + raw[8:])
        return f"{kind} {f.name}={new}"
    if kind in ("config field", "config type"):
        key = rng.choice(sorted(json.loads((ck / "config.json").read_text())))
        value = rng.choice(ODD_VALUES) if kind == "config type" else rng.choice([1, 2, 4, 8, 64, 100000])
        edit_json(ck / "config.json", lambda c: c.__setitem__(key, value))
        return f"{kind} {key}={value!r}"
    if kind == "json not object":
        target = rng.choice([ck / "config.json", ck / INDEX])
        target.write_text(rng.choice(["[1, 2]", "3", '"x"', "null", "{", ""]))
        return f"{kind} {target.name}"
    if kind == "index entry":
        name = rng.choice(sorted(json.loads((ck / INDEX).read_text())["weight_map"]))
        how = rng.choice(["drop", "abs", "dotdot", "missing", "other shard", "bogus name", "not str"])
        value = {"abs": "/etc/hosts.safetensors", "dotdot": "../micro/x.safetensors", "missing": "nope.safetensors",
                 "other shard": rng.choice(shards(ck)).name, "not str": 7}.get(how)

        def change(d):
            if how == "drop":
                del d["weight_map"][name]
            elif how == "bogus name":
                d["weight_map"]["model.layers.0.bogus.weight"] = d["weight_map"][name]
            else:
                d["weight_map"][name] = value
        edit_json(ck / INDEX, change)
        return f"{kind} {how} {name}"
    if kind in ("offsets", "dtype/shape"):
        def change(h):
            name = rng.choice([k for k in h if k != "__metadata__"])
            e = h[name]
            if kind == "offsets":
                b, end = e["data_offsets"]
                e["data_offsets"] = rng.choice([[b, end + 1], [b - 1, end], [end, b], [-1, end], [0, end - b], [b, b],
                                                [b, "x"], None])
            else:
                field = rng.choice(["dtype", "shape"])
                e[field] = rng.choice(["F8_E5M2", "I32", "BF16", "F32", "X", [1], [e["shape"][0], 0] if e["shape"]
                                       else [], "s", None])
            return h
        set_header(f, change)
        return f"{kind} {f.name}"
    if kind == "fp8 bytes":
        f, name, b, e = tensor_bytes(rng, ck, lambda n, i: str(i.dtype) == "torch.float8_e4m3fn")
        raw = bytearray(f.read_bytes())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(b, e)] = rng.choice([0x7F, 0xFF, 0x80, 0x00, rng.randrange(256)])
        f.write_bytes(raw)
        return f"{kind} {name}"
    if kind == "scale":
        f, name, b, e = tensor_bytes(rng, ck, lambda n, i: n.endswith("_scale_inv"))
        raw = bytearray(f.read_bytes())
        pos = b + 4 * rng.randrange((e - b) // 4)
        value = rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e-30, 1e10, 100.0, 0.5])
        raw[pos:pos + 4] = struct.pack("<f", value)
        f.write_bytes(raw)
        return f"{kind} {name}={value}"
    raw = f.read_bytes()
    cut = rng.randrange(0, len(raw))
    f.write_bytes(raw[:cut])
    return f"truncate {f.name} to {cut}"


def digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


COMMANDS = {
    "run": lambda ck, out: ["run", ck, "--prompt", "hello", "--max-new-tokens", "2"],
    "dequant": lambda ck, out: ["convert", "dequant", ck, out, "--quiet"],
    "fnuz": lambda ck, out: ["convert", "fnuz", ck, out, "--quiet"],
    "reshard": lambda ck, out: ["convert", "reshard", ck, out, "--model-parallel", "2", "--dtype", "bf16", "--quiet"],
}


def check_result(r, what: str, ck: Path) -> bool:
    """True on success; on failure, one line naming a file. Never a traceback or an internal error."""
    assert "Traceback" not in r.output and "internal error" not in r.output, f"{what}:\n{r.output}"
    assert r.exit_code in (0, 2), f"{what}: exit {r.exit_code}\n{r.output}"
    if r.exit_code == 0:
        return True
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, f"{what}:\n{r.stderr}"
    names = [ck.name, "config.json", INDEX, ".safetensors"]
    assert any(n in errors[0] for n in names), f"{what}: the error names no file: {errors[0]}"
    return False


@pytest.mark.slow
def test_fuzzed_checkpoints_end_in_success_or_one_line(micro, tmp_path):
    runner = CliRunner()
    outcomes = {"ok": 0, "refused": 0}
    for seed in range(N_MUTATIONS):
        rng = random.Random(seed)
        work = tmp_path / f"m{seed}"
        ck = work / "ck"
        shutil.copytree(micro, ck)
        what = f"seed {seed}: " + mutate(rng, ck)
        before = digest(ck)
        verify = runner.invoke(main, ["convert", "verify", str(ck)])
        ok_verify = check_result(verify, what + " / verify", ck)
        results = {}
        for name, argv in COMMANDS.items():
            r = runner.invoke(main, [str(a) for a in argv(ck, work / name)])
            results[name] = check_result(r, f"{what} / {name}", ck)
        assert digest(ck) == before, f"{what}: SRC was modified"
        if not ok_verify:  # one validator: what verify refuses, nothing else accepts
            assert not any(results.values()), f"{what}: verify refused but {results} succeeded\n{verify.stderr}"
        else:  # conversions accept exactly what verify (and run's loader) accepts
            assert results["dequant"] and results["fnuz"], f"{what}: verify ok but {results}"
        if results["run"]:
            assert ok_verify, f"{what}: run succeeded on a checkpoint verify refuses"
        for name in ("dequant", "fnuz", "reshard"):
            if results[name]:
                r = runner.invoke(main, ["convert", "verify", str(work / name), "--checksums"])
                assert r.exit_code == 0, f"{what}: verify of the {name} output: {r.output}"
        expected = {"ck"} | {n for n in ("dequant", "fnuz", "reshard") if results[n]}
        assert {p.name for p in work.iterdir()} == expected, f"{what}: stray files {sorted(work.iterdir())}"
        outcomes["ok" if ok_verify else "refused"] += 1
        shutil.rmtree(work)
    print(f"{N_MUTATIONS} mutations: {outcomes}")
    assert outcomes["refused"] > N_MUTATIONS // 2 and outcomes["ok"] > 10  # the fuzzer reaches both ends
