"""`mlx-ltc bk train` and `mlx-ltc bk eval` end to end on a tiny model and a tiny corpus."""

import gc
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli, write_files
from mlx.utils import tree_flatten

from mlx_ltc.research.bk import BKConfig, BKModel
from mlx_ltc.research.bk import data as bk_data
from mlx_ltc.research.bk.evaluate import stream_eval
from mlx_ltc.research.bk.loss import nll_per_token, tied_nll_sum
from mlx_ltc.research.bk.train import check_out, load_checkpoint, run_settings, train, val_loss
from mlx_ltc.cli import cli
from mlx_ltc.config import BkCorpusConfig, BkModelConfig, BkTrainConfig, Config
from mlx_ltc.errors import UserError
from mlx_ltc.runtime.rundir import CONTINUE

TINY_MODEL = ("--d-model", "32", "--layers", "1", "--channels", "8", "--experts", "2", "--top-k", "1",
              "--expert-hidden", "32")  # fmt: skip
TINY_RUN = ("--seq-lens", "32,64", "--steps-per-length", "3", "--tokens-per-step", "128", "--val-tokens", "256",
            "--train-chunk", "48",  # length 64 trains in two chunks
            *TINY_MODEL, "--quiet")  # fmt: skip
ROW_KEYS = {"seq_len", "steps", "tokens", "final_train_loss", "val_loss", "val_ppl", "spikes", "nonfinite",
            "grad_norm_mean", "grad_norm_std", "grad_norm_min", "grad_norm_max", "tokens_per_s", "peak_bytes",
            "seconds"}  # fmt: skip


def corpus_files(n=8):
    return {
        f"pkg/mod_{i}.py": "".join(
            f"def f{i}_{j}(a, b={j}):\n    '''Mix a with {i * j}.'''\n    return a * {i + j} - b // {j + 1}\n\n"
            for j in range(30)
        )
        for i in range(n)
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("bk") / "corpus", corpus_files())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir, corpus):
    out = tmp_path_factory.mktemp("bk") / "run"
    proc = run_cli("bk", "train", "--corpus", corpus, "--out", out, *TINY_RUN)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, fragment):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_tied_head_loss_matches_full_logits():
    """Value and both gradients (hidden and the tied embedding) of the chunked loss, chunks not dividing N."""
    rng = np.random.default_rng(0)
    hidden, weight = (mx.array(rng.normal(size=s).astype(np.float32)) for s in ((2, 37, 8), (300, 8)))
    targets = mx.array(rng.integers(0, 300, (2, 37)).astype(np.int32))
    full = lambda h, w: nn.losses.cross_entropy(h @ w.T, targets, reduction="sum")
    chunked = lambda h, w: tied_nll_sum(h, w, targets, rows=10)
    (want, want_grads), (got, got_grads) = (mx.value_and_grad(f, (0, 1))(hidden, weight) for f in (full, chunked))
    assert abs(got.item() - want.item()) < 1e-6 * want.item()
    for g, w in zip(got_grads, want_grads):
        assert mx.abs(g - w).max().item() < 1e-5 * mx.abs(w).max().item()
    per_token = nll_per_token(hidden[0], weight, targets[0], rows=7)
    assert mx.abs(per_token - nn.losses.cross_entropy(hidden[0] @ weight.T, targets[0])).max().item() < 1e-5


def test_tied_head_loss_memory_does_not_grow_with_length():
    """Value and gradients of the chunked loss keep a bounded number of (rows x V) blocks alive: 4x the
    positions must not raise the peak (it did, one block per chunk, before the chunks were chained)."""
    rng = np.random.default_rng(1)
    weight = mx.array(rng.normal(size=(8192, 32)).astype(np.float32))

    def peak(n):
        hidden = mx.array(rng.normal(size=(1, n, 32)).astype(np.float32))
        targets = mx.array(rng.integers(0, 8192, (1, n)).astype(np.int32))
        mx.eval(hidden, targets, weight)
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.value_and_grad(lambda h, w: tied_nll_sum(h, w, targets, rows=64), (0, 1))(hidden, weight))
        return mx.get_peak_memory() - base

    peak(256)  # warm-up
    short, long = peak(2048), peak(8192)
    assert long < 1.15 * short, (short, long)


def test_train_writes_results_checkpoints_and_metrics(tiny_run):
    out, proc = tiny_run
    results = json.loads((out / "results.json").read_text())
    assert results["nonfinite"] == 0
    assert results["model"]["d_model"] == 32 and results["train"]["seq_lens"] == [32, 64]
    assert results["corpus"]["root"].endswith("corpus")
    rows = results["lengths"]
    assert [r["seq_len"] for r in rows] == [32, 64]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        batch = 128 // r["seq_len"]
        assert (r["steps"], r["tokens"], r["nonfinite"]) == (3, 3 * batch * r["seq_len"], 0)
        assert math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9)
        assert 0 < r["val_loss"] < 12 and 0 < r["final_train_loss"] < 12  # ln(49152) = 10.8 at random init
        assert 0 < r["grad_norm_min"] <= r["grad_norm_mean"] <= r["grad_norm_max"]
        assert r["grad_norm_std"] >= 0 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["seconds"] > 0
        assert (out / "checkpoints" / f"len-{r['seq_len']:07d}" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(m["seq_len"], m["length_step"]) for m in metrics] == [(32, 1), (32, 2), (32, 3), (64, 1), (64, 2), (64, 3)]
    assert all(m["applied"] and m["events"] == [] for m in metrics)
    grad_32 = np.array([m["grad_norm"] for m in metrics[:3]])
    assert math.isclose(rows[0]["grad_norm_mean"], grad_32.mean(), rel_tol=1e-9)
    summary = (out / "summary.txt").read_text()
    assert "final ppl" in summary and "grad norm mean ± std" in summary
    assert summary.splitlines()[1].split()[:2] == ["32", f"{rows[0]['val_ppl']:.3f}"]
    assert summary in proc.stdout
    assert len(np.load(out / "data" / "val.npy")) > 64 and len(np.load(out / "data" / "train.npy")) > 64


def test_checkpoints_reload_to_the_reported_val_loss(tiny_run):
    out, _ = tiny_run
    val = bk_data.load(out / "data").val
    logits = {}
    for row in json.loads((out / "results.json").read_text())["lengths"]:
        model, state = load_checkpoint(out, row["seq_len"])
        assert state["row"] == row
        loss, _ = val_loss(model, val, row["seq_len"], 256, 128 // row["seq_len"])
        assert abs(loss - row["val_loss"]) < 1e-5 * row["val_loss"]
        logits[row["seq_len"]] = np.array(model(mx.array(val[None, :64])))
    assert np.abs(logits[32] - logits[64]).max() > 1e-3  # each length's checkpoint is its own
    assert load_checkpoint(out)[1]["seq_len"] == 64


def test_streamed_nll_equals_one_shot(tiny_run):
    out, _ = tiny_run
    model, _ = load_checkpoint(out)
    tokens = bk_data.load(out / "data").train[:301]
    logits = model(mx.array(tokens[None, :-1]))
    one_shot = nn.losses.cross_entropy(logits[0], mx.array(tokens[1:]), reduction="mean").item()
    for chunk in (37, 300, 1000):
        (point,) = stream_eval(model, tokens, chunk, marks=[len(tokens)])
        assert point.tokens == 301 and abs(point.nll - one_shot) < 1e-5 * one_shot, (chunk, point.nll, one_shot)


def test_stream_memory_stays_constant():
    # big enough that a chunk's working set (MBs) dominates the peak, not stray arrays of other tests (KBs)
    mx.random.seed(0)
    model = BKModel(BKConfig(vocab_size=256, d_model=64, n_layers=1, n_experts=2, top_k=1, expert_hidden=64))
    mx.eval(model.parameters())
    tokens = np.random.default_rng(0).integers(0, 256, 16385).astype(np.int32)
    gc.collect()
    # the allocator's transients settle over the first few chunks (1024 tokens in: 4.6-5.3 MB, by 4096: 5.9 MB,
    # whatever ran before); a state that grew with the stream would add ~0.13 MB a chunk from there on
    points = stream_eval(model, tokens, chunk=512, marks=[4096, 8192, 16385])
    assert [p.tokens for p in points] == [4096, 8192, 16385]
    assert points[-1].peak_bytes <= 1.1 * points[0].peak_bytes, [p.peak_bytes for p in points]
    assert all(0 < p.nll < 10 for p in points)


def test_eval_command_streams_a_corpus(tiny_run, corpus, tmp_path):
    out, _ = tiny_run
    result = invoke("bk", "eval", out, "--corpus", corpus, "--stream-tokens", 3000, "--chunk", 256,
                    "--json", tmp_path / "s.json", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["checkpoint_seq_len"] == 64 and report["source"]["kind"] == "corpus"
    assert [p["tokens"] for p in report["points"]] == [1024, 3000]
    for p in report["points"]:
        assert set(p) == {"tokens", "nll", "peak_bytes", "tokens_per_s"} and 0 < p["nll"] < 12
    assert "1,024" in result.output and "3,000" in result.output
    default = invoke("bk", "eval", out, "--length", 32, "--chunk", 50, "--quiet")  # the run's val slice
    assert default.exit_code == 0 and "length-32 checkpoint" in default.output, default.output


def test_resume_trains_only_the_new_lengths(tiny_run, corpus, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    before = json.loads((out / "results.json").read_text())["lengths"]
    args = [a if a != "32,64" else "32,64,128" for a in TINY_RUN]
    result = invoke("bk", "train", "--corpus", corpus, "--out", out, *args)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["lengths"]
    assert rows[:2] == before and rows[2]["seq_len"] == 128 and rows[2]["steps"] == 3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 10))
    again = invoke("bk", "train", "--corpus", corpus, "--out", out, *args)
    assert_one_line_error(again, "already holds a finished run")


@pytest.mark.slow
def test_ctrl_c_inside_a_length_saves_and_the_run_continues_exactly(cache_dir, corpus, tmp_path):
    args = ("--corpus", corpus, "--seq-lens", "32,64", "--steps-per-length", "12", "--tokens-per-step", "64",
            "--val-tokens", "128", "--train-chunk", "48", *TINY_MODEL, "--quiet")  # fmt: skip
    straight = run_cli("bk", "train", "--out", tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_ltc", "bk", "train", "--out", str(out), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 15):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # inside length 64, whose 12 updates follow length 32's
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted: saved length 64 after update" in stderr and (out / "checkpoints" / "partial").is_dir()
    assert not (out / "checkpoints" / "len-0000064").exists()
    resumed = run_cli("bk", "train", "--out", out, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "length 64 continues after update" in resumed.stderr
    assert not (out / "checkpoints" / "partial").exists()

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["seq_len"], r["length_step"], r["loss"], r["grad_norm"], r["tokens"]) for r in rows]

    assert losses(out) == losses(tmp_path / "straight") and len(losses(out)) == 24
    got, want = (json.loads((run / "results.json").read_text())["lengths"] for run in (out, tmp_path / "straight"))
    for g, w in zip(got, want):
        for key in ("steps", "tokens", "final_train_loss", "val_loss", "grad_norm_mean", "grad_norm_std"):
            assert g[key] == w[key], key
    a, b = (dict(tree_flatten(load_checkpoint(run)[0].parameters())) for run in (out, tmp_path / "straight"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in b)


def test_nonfinite_updates_are_skipped_counted_and_stop_a_diverging_run(cache_dir, corpus, tmp_path):
    model = BkModelConfig(d_model=16, n_layers=1, channels=8, n_experts=2, top_k=1, expert_hidden=16)
    opts = BkTrainConfig(seq_lens=[32], steps_per_length=4, tokens_per_step=64, val_tokens=64, inject_nan=[2])
    results = train(model, opts, BkCorpusConfig(str(corpus)), tmp_path / "a", progress=False, log=lambda m: None)
    (row,) = results["lengths"]
    assert (row["nonfinite"], row["steps"], results["nonfinite"]) == (1, 3, 1)
    weights = tree_flatten(load_checkpoint(tmp_path / "a")[0].parameters())
    assert all(np.isfinite(np.array(w)).all() for _, w in weights)
    opts = replace(opts, inject_nan=[2, 3, 4])
    with pytest.raises(UserError, match="diverged"):
        train(model, opts, BkCorpusConfig(str(corpus)), tmp_path / "b", progress=False, log=lambda m: None)


def test_bad_input_is_one_error_line(tiny_run, corpus, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    binary = write_files(tmp_path / "binary", {"a.bin": b"\0\1\2"})
    cases = [
        (("--corpus", tmp_path / "missing"), "no such directory"),
        (("--corpus", empty), "is empty"),
        (("--corpus", binary), "no text source files"),
        (("--corpus", corpus, "--repo", corpus), "not both"),
        (("--corpus", corpus, "--seq-lens", "64,32"), "increasing lengths"),
        (("--corpus", corpus, "--seq-lens", "32,x"), "comma-separated integers"),
        (("--corpus", corpus, "--seq-lens", "1"), "at least 2 tokens"),
        (("--corpus", corpus, "--seq-lens", "100000", *TINY_MODEL), "fewer than the longest --seq-lens"),
        (("--corpus", corpus, "--val-share", "1.5"), "--val-share"),
    ]
    for args, message in cases:
        assert_one_line_error(invoke("bk", "train", "--out", out, "--quiet", *args), message)
        assert not out.exists(), args
    foreign = write_files(tmp_path / "foreign", {"notes.txt": "mine"})
    assert_one_line_error(invoke("bk", "train", "--corpus", corpus, "--out", foreign, "--overwrite"), "not a bk run")
    assert (foreign / "notes.txt").read_text() == "mine"
    run = tiny_run[0]
    assert_one_line_error(
        invoke("bk", "train", "--corpus", corpus, "--out", run, *TINY_RUN, "--lr", "0.5"), "other settings (train.lr)"
    )
    assert_one_line_error(invoke("bk", "eval", tmp_path / "nope"), "does not exist")
    assert_one_line_error(invoke("bk", "eval", foreign), "no finished length")
    assert_one_line_error(invoke("bk", "eval", run, "--corpus", tmp_path / "missing"), "not a directory")
    assert_one_line_error(invoke("bk", "eval", run, "--length", 48), "no checkpoint at length 48")


# run.json of `bk train --corpus /src --out OUT` as written before the options became config sections
OLD_RUN_JSON = {
    "model": {"d_model": 256, "n_layers": 4, "channels": None, "n_experts": 4, "top_k": 2, "expert_hidden": 512,
              "router": "learned"},
    "train": {"seq_lens": [128, 512, 2048, 8192, 32768, 131072], "steps_per_length": 200, "tokens_per_step": 32768,
              "lr": 0.001, "min_lr_ratio": 0.1, "warmup_steps": 20, "weight_decay": 0.1, "max_grad_norm": 1.0,
              "val_tokens": 65536, "seed": 0, "grad_checkpoint": False, "train_chunk": 8192, "inject_nan": []},
    "corpus": {"root": "/src", "val_share": 0.05, "max_tokens": 0},
}  # fmt: skip


def test_a_run_written_before_the_config_sections_continues_with_the_same_settings(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(OLD_RUN_JSON))
    bk = Config().bk
    settings = run_settings(bk.model, bk.train, replace(bk.corpus, root="/src"))
    assert settings == OLD_RUN_JSON
    assert check_out(out, settings, overwrite=False) == ([], CONTINUE)
    other = run_settings(bk.model, replace(bk.train, lr=0.01), replace(bk.corpus, root="/src"))
    with pytest.raises(UserError, match=r"other settings \(train.lr\)"):
        check_out(out, other, overwrite=False)
