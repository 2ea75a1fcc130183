"""`dsv3 run` end to end on the demo checkpoint, and every bad input giving one actionable line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsv3.cli import main


def dsv3(*args: str, input: str | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_run_prints_text_and_tokens_per_second(demo_ckpt):
    r = dsv3("run", demo_ckpt, "--prompt", "Hello world", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "prefill" in r.stderr and "decode" in r.stderr


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_run_cpu_weights(demo_ckpt, weights):
    r = dsv3("--verbose", "run", demo_ckpt, "--backend", "cpu", "--cpu-weights", weights, "--prompt", "Hello",
             "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert ("fp8 weights: float8_e4m3fn" if weights == "fp8" else "dequantized at load") in r.stderr, r.stderr


def test_run_greedy_is_deterministic(demo_ckpt):
    a = dsv3("run", demo_ckpt, "--prompt", "The quick brown fox", "--max-new-tokens", "12")
    b = dsv3("run", demo_ckpt, "--prompt", "The quick brown fox", "--max-new-tokens", "12")
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout


def test_input_file_batches_prompts(demo_ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("Hello\n\nHow are you today?\nDeepSeek\n")
    r = dsv3("run", demo_ckpt, "--input-file", f, "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("### ") == 3


def test_interactive_multi_turn(demo_ckpt):
    r = dsv3("run", demo_ckpt, "--interactive", "--max-new-tokens", "3",
             input="hello\nsecond turn\n/clear\nagain\n/exit\nnever read\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("prefill:") == 3
    assert "(cleared)" in r.stderr


def test_backends_lists_every_backend():
    r = dsv3("backends")
    assert r.exit_code == 0
    for name in ("cpu", "cuda", "rocm", "ascend"):
        assert name in r.stdout
    assert "<- auto" in r.stdout


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(ckpt: Path, tensor: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def break_truncate(ck):
    p = shard_of(ck, "model.layers.0.self_attn.q_a_proj.weight")
    p.write_bytes(p.read_bytes()[:-100])
    return p.name


def break_missing_shard(ck):
    p = shard_of(ck, "lm_head.weight")
    p.unlink()
    return p.name


def break_missing_scale(ck):
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    del index["weight_map"][name]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    return "o_proj.weight_scale_inv"


def break_config(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["topk_group"] = 99
    (ck / "config.json").write_text(json.dumps(cfg))
    return "topk_group"


def break_config_shape(ck):
    cfg = json.loads((ck / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (ck / "config.json").write_text(json.dumps(cfg))
    return "kv_a_proj_with_mqa"


def break_tokenizer(ck):
    (ck / "tokenizer.json").unlink()
    return "tokenizer.json"


@pytest.mark.parametrize("breaker", [break_truncate, break_missing_shard, break_missing_scale, break_config,
                                     break_config_shape, break_tokenizer])
def test_broken_checkpoints_give_one_line(breaker, demo_ckpt, tmp_path):
    ck = copy(demo_ckpt, tmp_path / "ck")
    needle = breaker(ck)
    r = dsv3("run", ck, "--prompt", "hi", "--max-new-tokens", "2")
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args,needle", [
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--backend", "ascend"], "not usable here"),
    (["--max-new-tokens", "5000"], "exceeds the context"),
    (["--max-seq-len", "8", "--max-new-tokens", "4"], "exceeds the context"),
    (["--cpu-weights", "fp8", "--dtype", "fp32"], "--dtype bf16"),
    (["--backend", "reference", "--cpu-weights", "fp8"], "the option is the cpu backend's"),
])
def test_bad_options_give_one_line(args, needle, demo_ckpt):
    r = dsv3("run", demo_ckpt, "--prompt", "a prompt that is longer than eight tokens for sure", *args)
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    r = dsv3("run", tmp_path, "--prompt", "hi")
    assert r.exit_code != 0 and "not a checkpoint" in r.stderr
    r = dsv3("run", tmp_path / "missing", "--prompt", "hi")
    assert r.exit_code != 0 and "no such directory" in r.stderr


def test_no_prompt_source(demo_ckpt):
    r = dsv3("run", demo_ckpt)
    assert r.exit_code != 0 and "exactly one of --prompt" in r.stderr


def test_real_process_exit_code_and_debug(demo_ckpt, tmp_path):
    """Through a real interpreter: exit status, no traceback, and --debug shows one."""
    cmd = [sys.executable, "-m", "dsv3", "run", str(tmp_path), "--prompt", "x"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "dsv3", "--debug", *cmd[3:]], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_run_json_answers_one_object(demo_ckpt):
    from dsv3.serve.json_mode import START, advance

    r = dsv3("run", demo_ckpt, "--prompt", "JSON please", "--json", "--max-new-tokens", "200", "--temperature", "1",
             "--seed", "1")
    assert r.exit_code == 0, r.output
    text = r.stdout.rstrip("\n")
    try:
        assert isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        assert advance(START, text.encode()) is not None, text  # cut by --max-new-tokens: the beginning of one
    greedy = dsv3("run", demo_ckpt, "--prompt", "x", "--json", "--max-new-tokens", "24", "--dtype", "fp32")
    drafted = dsv3("run", demo_ckpt, "--prompt", "x", "--json", "--max-new-tokens", "24", "--dtype", "fp32",
                   "--speculative", "mtp")
    assert drafted.exit_code == 0 and "acceptance" in drafted.stderr, drafted.output
    assert drafted.stdout == greedy.stdout, (drafted.stdout, greedy.stdout)


def test_run_json_schema_answers_what_the_schema_accepts(demo_ckpt, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from dsv3.serve.schema import compile_schema

    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    r = dsv3("run", demo_ckpt, "--prompt", "JSON please", "--json-schema", str(tmp_path / "s.json"),
             "--max-new-tokens", "60")
    assert r.exit_code == 0, r.output
    text = r.stdout.rstrip("\n")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:  # cut by --max-new-tokens: the beginning of an answer the schema accepts
        g, st = compile_schema(schema), compile_schema(schema).start
        for c in text.encode():
            st = g.step(st, c) if st is not None else None
        assert st is not None, text
    else:
        assert jsonschema.Draft202012Validator(schema).is_valid(value), text
    (tmp_path / "bad.json").write_text('{"type": "string", "format": "hostname"}')
    for path, msg in [(tmp_path / "bad.json", "format 'hostname' is not enforced"), (tmp_path / "none.json", "no such file")]:
        bad = dsv3("run", demo_ckpt, "--prompt", "x", "--json-schema", str(path))
        assert bad.exit_code != 0 and msg in bad.output, bad.output
