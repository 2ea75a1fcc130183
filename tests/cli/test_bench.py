"""`dsv3 bench` on the demo checkpoint: the table and JSON it prints, the arithmetic behind them (against runs of
known length), side-by-side MTP drafting, and one actionable line for each bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import dsv3
from dsv3.cli import main
from dsv3.cli.bench_cmd import measure, table
from dsv3.core.generate import Stats
from dsv3.synthetic import DEMO, write_checkpoint


def dsv3_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_bench_prints_a_row_per_batch_and_prompt_length(demo_ckpt):
    r = dsv3_cli("bench", demo_ckpt, "--batch", "1,3", "--prompt-len", "5,17", "--new-tokens", "4", "--repeats", "1")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "cpu on cpu" in lines[0], lines[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("| ")]
    assert [(c[1], c[2], c[3]) for c in rows[1:]] == [("1", "5", "4"), ("1", "17", "4"), ("3", "5", "4"),
                                                      ("3", "17", "4")], rows
    assert all(c[0] == "plain" and float(c[5]) > 0 and float(c[6]) > 0 for c in rows[1:]), rows
    assert "median of 1 run(s) after a warm-up" in r.stdout


def test_bench_json_and_mtp_side_by_side(demo_ckpt, tmp_path):
    out = tmp_path / "bench.json"
    r = dsv3_cli("bench", demo_ckpt, "--batch", "2", "--prompt-len", "6", "--new-tokens", "5", "--repeats", "2",
                 "--speculative", "mtp", "--json", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["machine"]["backend"].startswith("cpu") and data["machine"]["resident_weight_bytes"] > 0
    plain, mtp = data["rows"]
    assert (plain["mode"], mtp["mode"]) == ("plain", "mtp k=1")
    assert plain["acceptance"] is None and 0.0 <= mtp["acceptance"] <= 1.0
    for row in data["rows"]:
        assert row["batch"] == 2 and row["prompt_len"] == 6 and row["new_tokens"] == 5
        # the per-row time of a token after the first and the rate over every row describe the same runs
        assert row["decode_tok_s"] * row["ms_per_token"] / 1e3 == pytest.approx(2.0)
    assert "mtp k=1" in r.stdout and "x |" in r.stdout  # the speed-up column is filled for the drafting row
    r = dsv3_cli("bench", demo_ckpt, "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1",
                 "--json", "-")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"][0]["mode"] == "plain"  # JSON alone on stdout


class FakeEngine:
    """An engine whose runs take known times: prefill and decode seconds from lists, in call order."""

    def __init__(self, prefill, decode):
        self.prefill, self.decode, self.calls = list(prefill), list(decode), []
        self.cfg = type("Cfg", (), {"vocab_size": 50})()
        self.kernels = type("K", (), {"device": __import__("torch").device("cpu")})()

    def generate(self, prompts, max_new_tokens, speculative=None, draft_tokens=1, ignore_eos=False):
        self.calls.append((len(prompts), len(prompts[0]), max_new_tokens, speculative, ignore_eos))
        self.last_stats = Stats(prefill_s=self.prefill.pop(0), decode_s=self.decode.pop(0),
                                extra={"decode_step": "graph"})
        return [[0] * max_new_tokens for _ in prompts]

    def release(self):
        self.calls.append("release")


def test_measure_reports_the_medians_of_the_timed_runs_and_skips_the_warm_up():
    # warm-up (10 s, ignored), then 0.2, 0.1, 0.4 s of prefill and 3, 1, 2 s of decode: medians 0.2 s and 2 s
    e = FakeEngine([10.0, 0.2, 0.1, 0.4], [10.0, 3.0, 1.0, 2.0])
    [row] = measure(e, batch=4, prompt_len=100, new_tokens=11, repeats=3, seed=0)
    assert e.calls == [(4, 100, 11, None, True)] * 4 + ["release"]
    assert row["prefill_ms"] == pytest.approx(200.0) and row["prefill_tok_s"] == pytest.approx(4 * 100 / 0.2)
    assert row["decode_tok_s"] == pytest.approx(4 * 10 / 2.0)  # 10 tokens after the first per row, 4 rows, 2 s
    assert row["ms_per_token"] == pytest.approx(2000.0 / 10)


def test_measure_alternates_the_modes_and_table_shows_the_ratio():
    e = FakeEngine([1.0] * 6, [9.0, 9.0, 1.0, 2.0, 2.0, 1.0])  # plain 2 s, drafting 1 s per run
    rows = measure(e, batch=1, prompt_len=8, new_tokens=5, repeats=2, seed=0, modes=(None, "mtp"))
    assert [c[3] for c in e.calls[:-1]] == [None, "mtp", "mtp", None, None, "mtp"], e.calls  # the order rotated
    assert [r["mode"] for r in rows] == ["plain", "mtp k=1"]
    assert rows[1]["decode_tok_s"] == pytest.approx(2 * rows[0]["decode_tok_s"])
    assert rows[1]["vs_plain"] == pytest.approx(2.0) and rows[0]["vs_plain"] is None
    assert "2.00x" in table(rows)


def test_the_speed_up_is_the_median_of_ratios_made_side_by_side():
    """A slow spell of the machine in the third round doubles both its runs' times: each round's ratio still reads
    drafting 2x plain, twice of three, while the two modes' medians (plain 1 s, drafting 2 s) would read 0.5x."""
    e = FakeEngine([1.0] * 8, [9.0, 9.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0])  # rounds: (1, 0.5), (1, 2), (4, 2) s
    rows = measure(e, batch=1, prompt_len=8, new_tokens=5, repeats=3, seed=0, modes=(None, "mtp"))
    assert [c[3] for c in e.calls[2:-1]] == ["mtp", None, None, "mtp", "mtp", None], e.calls
    assert rows[1]["decode_tok_s"] == pytest.approx(0.5 * rows[0]["decode_tok_s"])
    assert rows[1]["vs_plain"] == pytest.approx(2.0)
    assert "2.00x" in table(rows) and "0.50x" not in table(rows)


@pytest.mark.parametrize("args,message", [
    (["--batch", "0"], "positive integers"),
    (["--prompt-len", "8,x"], "positive integers"),
    (["--new-tokens", "1"], "1 is not in the range"),
    (["--prompt-len", "60", "--new-tokens", "10", "--max-seq-len", "64"], "exceeds --max-seq-len 64"),
    (["--json", "/nonexistent-dir/bench.json"], "there is no directory /nonexistent-dir"),
])
def test_bad_input_is_one_line(demo_ckpt, args, message):
    r = dsv3_cli("bench", demo_ckpt, *args)
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    assert "Traceback" not in r.output


def test_speculative_without_an_mtp_layer_is_one_line(tmp_path):
    ckpt = write_checkpoint(tmp_path / "nomtp", {**DEMO, "num_nextn_predict_layers": 0}, seed=0)
    r = dsv3_cli("bench", ckpt, "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--speculative", "mtp")
    assert r.exit_code == 2 and "no MTP layer" in r.stderr, r.output


def test_generate_can_ignore_end_of_sequence(demo_ckpt):
    """What the benchmark runs on: with ignore_eos a prompt gets every token asked for, the very tokens of a run
    that would otherwise stop at a token it produces mid-way."""
    e = dsv3.load(demo_ckpt, backend="cpu", dtype="fp32")
    prompt = [[5, 9, 200, 17]]
    full = e.generate(prompt, max_new_tokens=12)[0]
    eos = full[5]
    e.tokenizer.eos_id = eos
    assert e.generate(prompt, max_new_tokens=12)[0] == full[:full.index(eos)]
    assert e.generate(prompt, max_new_tokens=12, ignore_eos=True)[0] == full
    assert e.generate(prompt, max_new_tokens=12, ignore_eos=True, speculative="mtp")[0] == full
