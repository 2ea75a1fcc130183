"""Never lose or corrupt a checkpoint (issue 16): each case found by trying broken inputs, as a test.

Every refusal is one line, exit 2, names the file (and tensor) and leaves no half-written output.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsv3.cli import main
from dsv3.convert import common
from dsv3.core.safetensors_io import StreamingWriter, read_header
from dsv3.synthetic import write_checkpoint
from dsv3.synthetic.checkpoint import DEMO

INDEX = "model.safetensors.index.json"
W = "model.layers.0.self_attn.o_proj.weight"


def cli(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def one_line_error(r, *needles, after: int = 0) -> None:
    """Exit 2 and one `error:` line on stderr (after `after` lines of banner)."""
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()][after:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def ck(demo_ckpt, tmp_path) -> Path:
    """A private copy of the demo checkpoint to break."""
    dst = tmp_path / "ck"
    shutil.copytree(demo_ckpt, dst)
    return dst


def shard_of(ck: Path, name: str) -> Path:
    return ck / json.loads((ck / INDEX).read_text())["weight_map"][name]


def patch_bytes(ck: Path, name: str, fn) -> Path:
    """Change a tensor's raw bytes in place: fn(bytearray of the tensor) mutates it."""
    f = shard_of(ck, name)
    info = read_header(f)[0][name]
    raw = bytearray(f.read_bytes())
    part = raw[info.begin:info.end]
    fn(part)
    raw[info.begin:info.end] = part
    f.write_bytes(raw)
    return f


def rewrite_header(f: Path, fn) -> None:
    """Replace a shard's JSON header by fn(header dict) (data bytes unchanged)."""
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = fn(json.loads(raw[8:8 + n]))
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def converted(demo_ckpt: Path, dst: Path) -> Path:
    r = cli("convert", "dequant", demo_ckpt, dst, "--quiet")
    assert r.exit_code == 0, r.output
    return dst


# ---- 1. --force never deletes what dsv3 did not write -----------------------------------------------
def test_force_refuses_dst_that_contains_src(demo_ckpt, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(demo_ckpt, models / "v3")
    r = cli("convert", "dequant", models / "v3", models, "--force", "--quiet")
    one_line_error(r, "contains SRC")
    assert (models / "v3" / "config.json").is_file() and len(list((models / "v3").iterdir())) == len(
        list(demo_ckpt.iterdir()))


def test_force_refuses_a_folder_dsv3_did_not_write(demo_ckpt, tmp_path):
    scratch = tmp_path / "scratch"
    (scratch / "notes").mkdir(parents=True)
    (scratch / "notes" / "a.txt").write_text("mine")
    one_line_error(cli("convert", "dequant", demo_ckpt, scratch, "--force"), "dsv3-manifest.json")
    assert (scratch / "notes" / "a.txt").read_text() == "mine"


def test_force_replaces_an_earlier_output_but_not_files_added_to_it(demo_ckpt, tmp_path):
    dst = converted(demo_ckpt, tmp_path / "out")
    (dst / "README.txt").write_text("added by the user")
    one_line_error(cli("convert", "dequant", demo_ckpt, dst, "--force"), "README.txt")
    assert (dst / "README.txt").exists()
    (dst / "README.txt").unlink()
    r = cli("convert", "dequant", demo_ckpt, dst, "--force", "--quiet", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left aside


def test_force_refuses_cwd_home_and_symlinks(demo_ckpt, tmp_path, monkeypatch):
    dst = converted(demo_ckpt, tmp_path / "out")
    monkeypatch.chdir(dst)
    one_line_error(cli("convert", "dequant", demo_ckpt, dst, "--force"), "current directory")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(dst / "home"))
    (dst / "home").mkdir()
    one_line_error(cli("convert", "dequant", demo_ckpt, dst, "--force"), "home directory")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    link = tmp_path / "link"
    link.symlink_to(dst)
    one_line_error(cli("convert", "dequant", demo_ckpt, link, "--force"), "symbolic link")
    assert (dst / "config.json").is_file()


def test_a_partial_dir_that_is_not_ours_is_never_deleted(demo_ckpt, tmp_path):
    foreign = tmp_path / ".out.partial"
    foreign.mkdir()
    (foreign / "data.bin").write_text("someone else's")
    one_line_error(cli("convert", "dequant", demo_ckpt, tmp_path / "out"), "not made by dsv3")
    assert (foreign / "data.bin").exists()


def test_force_and_resume_are_documented():
    r = cli("convert", "dequant", "--help")
    assert "dsv3-manifest.json" in r.output and "symlink" in r.output and "unchanged SRC" in r.output
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "--force" in readme and "dsv3-manifest.json" in readme and "--resume" in readme


# ---- 2. --resume continues only the same job on the same source --------------------------------------
def interrupt_after(monkeypatch, n_files: int):
    finished = common.Output.finished

    def stop(self, name, digest=None):
        finished(self, name, digest)
        if len(self.done) >= n_files:
            raise KeyboardInterrupt

    monkeypatch.setattr(common.Output, "finished", stop)


def test_resume_refuses_other_options_and_a_changed_source(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", DEMO, seed=3, n_shards=4)
    dst = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert cli("convert", "dequant", src, dst, "--quiet").exit_code == 130
    one_line_error(cli("convert", "dequant", src, dst, "--resume", "--dtype", "fp32"), "--resume", "options")
    shard = next(src.glob("model-00004*"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    one_line_error(cli("convert", "dequant", src, dst, "--resume"), "shard files changed")
    one_line_error(cli("convert", "reshard", src, dst, "--model-parallel", "1", "--resume"), "command")
    assert not dst.exists() and (tmp_path / ".out.partial").is_dir()
    assert cli("convert", "dequant", src, dst, "--quiet").exit_code == 0  # without --resume: starts over


def test_resume_skips_finished_files(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", DEMO, seed=3, n_shards=4)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert cli("convert", "dequant", src, tmp_path / "out", "--quiet").exit_code == 130
    written = []
    init = StreamingWriter.__init__

    def spy(self, path, *a, **k):
        written.append(Path(path).name)
        init(self, path, *a, **k)

    monkeypatch.setattr(StreamingWriter, "__init__", spy)
    assert cli("convert", "dequant", src, tmp_path / "out", "--quiet", "--resume").exit_code == 0
    assert len(written) == 2  # 4 shards, 2 kept


# ---- 3. disk full: name the path, resume counts only what remains ---------------------------------------
def test_disk_full_mid_run_then_resume_needs_only_the_rest(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", DEMO, seed=3, n_shards=4)
    dst = tmp_path / "out"
    emit, calls = StreamingWriter._emit, []

    def full_disk(self, data):
        calls.append(1)
        if self.path.name.startswith("model-00003"):
            raise OSError(errno.ENOSPC, "No space left on device")
        emit(self, data)

    with monkeypatch.context() as m:
        m.setattr(StreamingWriter, "_emit", full_disk)
        one_line_error(cli("convert", "dequant", src, dst, "--quiet"), ".out.partial", "no space left", "--resume")
    partial = tmp_path / ".out.partial"
    done = json.loads((partial / common.PROGRESS).read_text())["files"]
    assert len(done) == 2
    ref = converted(src, tmp_path / "ref")
    total = json.loads((ref / INDEX).read_text())["metadata"]["total_size"]  # what the output needs
    kept = sum(e["size"] for e in done.values())
    real = shutil.disk_usage(tmp_path)

    def free_just_enough(path):  # enough for the rest, not for the whole output again
        return real._replace(free=total - kept // 2)

    monkeypatch.setattr(common.shutil, "disk_usage", free_just_enough)
    r = cli("convert", "dequant", src, dst, "--quiet", "--resume")
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: real._replace(free=1000))
    shutil.rmtree(dst)
    one_line_error(cli("convert", "dequant", src, dst, "--quiet"), "not enough disk space", "GB more")


# ---- 4. NaN FP8 bytes and bad scales are refused everywhere ----------------------------------------------
BAD_VALUES = {
    "fp8 0x7F": (W, lambda b: b.__setitem__(3, 0x7F), "NaN bytes"),
    "fp8 0xFF": (W, lambda b: b.__setitem__(0, 0xFF), "NaN bytes"),
    "nan scale": (W + "_scale_inv", lambda b: b.__setitem__(slice(0, 4), struct.pack("<f", float("nan"))), "NaN/Inf"),
    "inf scale": (W + "_scale_inv", lambda b: b.__setitem__(slice(0, 4), struct.pack("<f", float("inf"))), "NaN/Inf"),
    "negative scale": (W + "_scale_inv", lambda b: b.__setitem__(slice(0, 4), struct.pack("<f", -0.5)), "block scales"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_refused_by_run_every_conversion_and_verify(ck, tmp_path, case):
    name, fn, needle = BAD_VALUES[case]
    f = patch_bytes(ck, name, fn)
    one_line_error(cli("run", ck, "--prompt", "hi", "--max-new-tokens", "1"), f.name, name, needle)
    for cmd in (["dequant"], ["fnuz"], ["reshard", "--model-parallel", "1"]):
        dst = tmp_path / f"out-{cmd[0]}"
        one_line_error(cli("convert", cmd[0], ck, dst, *cmd[1:], "--quiet"), f.name, name, needle)
        assert not dst.exists() and not (tmp_path / f".out-{cmd[0]}.partial").exists()
    r = cli("convert", "verify", ck)
    assert r.exit_code == 2 and needle in r.stderr and name in r.stderr


# ---- 5. the safetensors header is validated whole; index paths stay inside --------------------------
def _entry(name):
    def change(h):
        h[name] = dict(h[name])
        return h
    return change


HEADERS = {
    "overlap": (lambda h, n: h[n].__setitem__("data_offsets", [0, h[n]["data_offsets"][1] - h[n]["data_offsets"][0]]),
                "overlaps"),
    "negative": (lambda h, n: h[n].__setitem__("data_offsets", [-8, h[n]["data_offsets"][1]]), "non-negative"),
    "reversed": (lambda h, n: h[n].__setitem__("data_offsets", h[n]["data_offsets"][::-1]), "data_offsets"),
    "size": (lambda h, n: h[n].__setitem__("shape", [h[n]["shape"][0] - 1, h[n]["shape"][1]]), "needs"),
    "dtype": (lambda h, n: h[n].__setitem__("dtype", "Q4"), "unknown dtype"),
    "shape type": (lambda h, n: h[n].__setitem__("shape", "big"), "shape"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_bad_header_entries_refused(ck, case):
    fn, needle = HEADERS[case]
    f = shard_of(ck, W)

    def change(h):
        fn(h, W)
        return h

    rewrite_header(f, change)
    one_line_error(cli("run", ck, "--prompt", "hi"), f.name, needle)
    r = cli("convert", "verify", ck)
    assert r.exit_code == 2 and needle in r.stderr


def test_header_that_is_json_but_not_an_object(ck):
    f = shard_of(ck, W)
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = b"[1, 2]".ljust(n)
    f.write_bytes(raw[:8] + body + raw[8 + n:])
    one_line_error(cli("run", ck, "--prompt", "hi"), f.name, "expected an object")
    one_line_error(cli("convert", "dequant", ck, ck.parent / "o"), f.name, "expected an object")


@pytest.mark.parametrize("target", ["/etc/passwd.safetensors", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_paths_are_confined_to_the_checkpoint(ck, tmp_path, target):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(shard_of(ck, W), outside)  # a valid file out there must still not be read
    index = json.loads((ck / INDEX).read_text())
    index["weight_map"][W] = target
    (ck / INDEX).write_text(json.dumps(index))
    one_line_error(cli("run", ck, "--prompt", "hi"), "inside the checkpoint directory")
    one_line_error(cli("convert", "fnuz", ck, tmp_path / "o"), "inside the checkpoint directory")


# ---- 6. conversions accept exactly what run accepts, and drop nothing silently -------------------------
@pytest.mark.parametrize("change,needle", [
    (lambda c: c.pop("qk_rope_head_dim"), "qk_rope_head_dim"),
    (lambda c: c.__setitem__("model_type", "llama"), "model_type"),
])
def test_dequant_refuses_a_config_run_refuses(ck, tmp_path, change, needle):
    cfg = json.loads((ck / "config.json").read_text())
    change(cfg)
    (ck / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("run", ck, "--prompt", "hi"), needle)
    one_line_error(cli("convert", "dequant", ck, tmp_path / "o"), needle)


def test_a_tensor_missing_from_the_index_is_not_dropped(ck, tmp_path):
    index = json.loads((ck / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (ck / INDEX).write_text(json.dumps(index))
    for cmd in (["run", ck, "--prompt", "x"], ["convert", "dequant", ck, tmp_path / "o"]):
        one_line_error(cli(*cmd), "model.norm.weight", "does not list")


# ---- 7. wrong types and odd flags: one line, never an internal error ------------------------------------
@pytest.mark.parametrize("config,needle", [
    ({"num_experts_per_tok": "x"}, "num_experts_per_tok"),
    ({"hidden_size": 25.5}, "hidden_size"),
    ({"rope_scaling": {"type": "yarn", "factor": "x", "original_max_position_embeddings": 4096}}, "factor"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ({"eos_token_id": [1, "a"]}, "eos_token_id"),
    ({"moe_layer_freq": 0}, "moe_layer_freq"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}}, "weight_block_size"),
])
def test_config_values_of_the_wrong_type(ck, config, needle):
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(config)
    (ck / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("run", ck, "--prompt", "hi"), "config.json", needle)
    r = cli("convert", "verify", ck)
    assert r.exit_code == 2 and needle in r.stderr


def test_config_that_is_a_json_list(ck):
    (ck / "config.json").write_text("[1, 2]")
    one_line_error(cli("run", ck, "--prompt", "hi"), "config.json", "JSON object")


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--device", "nonsense"], "nonsense"),
])
def test_bad_run_flags(demo_ckpt, flags, needle):
    r = cli("run", demo_ckpt, "--prompt", "hi", *flags)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_binary_prompt_stdin_and_input_file(demo_ckpt, tmp_path):
    binary = b"\xff\xfe\x00abc".decode("utf-8", "surrogateescape")
    one_line_error(cli("run", demo_ckpt, "--prompt", binary), "--prompt", "UTF-8")
    f = tmp_path / "prompts.bin"
    f.write_bytes(b"hello\n\xff\xfe\n")
    one_line_error(cli("run", demo_ckpt, "--input-file", f), str(f), "UTF-8")
    r = CliRunner().invoke(main, ["run", str(demo_ckpt), "--interactive"], input=b"\xff\xfe\n")
    one_line_error(r, "stdin", "UTF-8", after=1)  # after the "interactive: ..." banner


def test_missing_tokenizer_reported_before_loading_weights(ck, monkeypatch):
    (ck / "tokenizer.json").unlink()
    import dsv3.engine

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(dsv3.engine, "load_weights", no_loading)
    one_line_error(cli("run", ck, "--prompt", "hi"), "tokenizer.json")


# ---- 8. verify: all three layouts, every problem listed --------------------------------------------------
def test_verify_reads_rank_files(demo_ckpt, tmp_path):
    r = cli("convert", "reshard", demo_ckpt, tmp_path / "mp", "--model-parallel", "2", "--dtype", "bf16", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("convert", "verify", tmp_path / "mp", "--checksums")
    assert r.exit_code == 0, r.output
    f = tmp_path / "mp" / "model1-mp2.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    r = cli("convert", "verify", tmp_path / "mp")
    assert r.exit_code == 2 and "model1-mp2.safetensors" in r.stderr and "truncated" in r.stderr


def test_verify_lists_every_problem(ck):
    patch_bytes(ck, W, lambda b: b.__setitem__(0, 0x7F))
    patch_bytes(ck, "model.layers.0.mlp.up_proj.weight_scale_inv",
                lambda b: b.__setitem__(slice(0, 4), struct.pack("<f", float("inf"))))
    index = json.loads((ck / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (ck / INDEX).write_text(json.dumps(index))
    r = cli("convert", "verify", ck)
    problems = [ln for ln in r.stderr.splitlines() if ln.startswith("problem: ")]
    assert r.exit_code == 2 and len(problems) >= 4, r.stderr
    assert any("NaN bytes" in p for p in problems) and any("NaN/Inf" in p for p in problems)
    assert any("does not list" in p for p in problems) and any("missing tensor model.norm" in p for p in problems)


# ---- 10. progress totals, printed text, Ctrl-D ----------------------------------------------------------
def test_dequant_progress_total_is_what_it_counts(demo_ckpt, tmp_path, monkeypatch):
    seen = {}

    class Spy(common.Progress):
        def __init__(self, total_bytes, n_files, desc, quiet):
            super().__init__(total_bytes, n_files, desc, True)
            seen.update(total=total_bytes, counted=0)

        def bytes(self, n):
            seen["counted"] += n

    import dsv3.convert.shards as shards

    monkeypatch.setattr(shards, "Progress", Spy)
    assert cli("convert", "dequant", demo_ckpt, tmp_path / "o").exit_code == 0
    assert seen["counted"] == seen["total"] > 0


def test_load_progress_has_a_total(demo_ckpt):
    import dsv3

    calls = []
    dsv3.load(demo_ckpt, backend="cpu", progress=lambda n, total: calls.append((n, total)))
    totals = {t for _, t in calls}
    assert len(totals) == 1 and sum(n for n, _ in calls) == totals.pop()


def test_generated_text_is_printed_without_control_bytes():
    from dsv3.cli.run_cmd import printable

    assert printable("ok\r\x05\x1b[2Jdone\n\tü中") == "ok\\r\\x05\\x1b[2Jdone\n\tü中"


def test_ctrl_d_in_interactive_ends_the_line(demo_ckpt, monkeypatch, capsys):
    """At a terminal, Ctrl-D makes input() raise EOFError with the cursor after the '>>> ' prompt."""
    import builtins
    import sys

    def eof(prompt=""):
        sys.stderr.write(prompt)
        raise EOFError

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(builtins, "input", eof)
    monkeypatch.setattr(sys, "stdin", Tty())
    main.main(["run", str(demo_ckpt), "--interactive"], standalone_mode=False)
    err = capsys.readouterr().err
    assert err.endswith(">>> \n"), repr(err)


@pytest.mark.parametrize("speculative", [(), ("--speculative", "mtp")], ids=["plain", "mtp"])
@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_nan_logits_are_an_error_not_an_empty_answer(demo_ckpt, monkeypatch, when, speculative):
    """Corruption the load-time checks cannot see (a large BF16 weight) ends as NaN logits: an error."""
    from dsv3.core.model import Transformer

    forward, calls = Transformer.forward_step, []

    def poisoned(self, *a, **k):
        logits, hidden = forward(self, *a, **k)
        calls.append(1)
        return (logits.fill_(float("nan")) if when == "prefill" or len(calls) > 1 else logits), hidden

    monkeypatch.setattr(Transformer, "forward_step", poisoned)
    one_line_error(cli("run", demo_ckpt, "--prompt", "hi", "--max-new-tokens", "3", *speculative), "NaN/Inf logits",
                   "verify")

