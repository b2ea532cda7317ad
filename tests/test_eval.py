"""`mlx-ltc eval`: each measurement against a naive computation, then the command end to end."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli, write_files

from mlx_ltc import data, models
from mlx_ltc.eval import context, perplexity, qa, stream
from mlx_ltc.eval.report import markdown
from mlx_ltc.eval.results import Report
from mlx_ltc.eval.run import split_stream


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return models.load(tiny_dir).model


def one_shot_nll(model, tokens) -> np.ndarray:
    """Per-target NLL from one forward pass over the whole sequence, float64 on the host."""
    logits = np.array(model(mx.array(tokens[None, :-1], dtype=mx.int32)).astype(mx.float32)[0], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return lse - logits[np.arange(len(logits)), tokens[1:]]


def stream_nll(model, tokens, window, chunk):
    return np.concatenate([nll for _, nll in stream.chunk_nll(model, tokens, window, chunk)])


def tokens_of(n, seed=0, vocab=2000):
    return np.random.default_rng(seed).integers(0, vocab, size=n).astype(np.int32)


def test_chunked_stream_equals_one_shot_where_both_fit(tiny):
    tokens = tokens_of(300)
    expected = one_shot_nll(tiny, tokens)
    np.testing.assert_allclose(stream_nll(tiny, tokens, None, 64), expected, atol=1e-4)
    np.testing.assert_allclose(stream_nll(tiny, tokens, 512, 64), expected, atol=1e-4)  # the window holds it all


def test_windowed_stream_is_sliding_window_attention(tiny_dir, tiny):
    """A bounded cache of W keys is sliding-window attention in every layer (as transformers computes
    it with `sliding_window = W`), whatever the chunking. It is not a truncated context: a key kept
    in the window carries what its own layer below saw further back."""
    torch = pytest.importorskip("torch")
    from mlx_ltc.reference import model as reference

    window, tokens = 24, tokens_of(110, seed=1)
    ref = reference.load(tiny_dir, torch.float64)
    ref.config.sliding_window = window
    with torch.no_grad():
        logits = ref(input_ids=torch.as_tensor(tokens[None, :-1], dtype=torch.long)).logits[0]
        expected = torch.nn.functional.cross_entropy(logits, torch.as_tensor(tokens[1:]).long(), reduction="none")
    for chunk in (7, 16, 200):
        np.testing.assert_allclose(stream_nll(tiny, tokens, window, chunk), expected.numpy(), atol=1e-4)
    assert not np.allclose(stream_nll(tiny, tokens, None, 16), expected.numpy(), atol=1e-3)  # the window matters


def test_stream_points_are_exact_at_every_mark(tiny):
    tokens = tokens_of(400, seed=2)
    expected = one_shot_nll(tiny, tokens)
    reported = []
    points = stream.stream_eval(tiny, tokens, None, chunk=64, marks=[50, 129, 300, 400], on_point=reported.append)
    assert [p.tokens for p in points] == [50, 129, 300, 400]
    assert reported == points
    for p in points:
        assert p.nll == pytest.approx(expected[: p.tokens - 1].mean(), abs=1e-5)
        assert p.window == 0 and p.peak_bytes > 0


@pytest.mark.slow
def test_stream_memory_does_not_grow_with_the_stream(tiny):
    tokens = tokens_of(64 * 1024, seed=3)
    points = stream.stream_eval(tiny, tokens, 256, chunk=256, marks=[8192, 64 * 1024])
    assert points[1].peak_bytes <= 1.1 * points[0].peak_bytes
    assert stream.marks_for(1 << 20) == [1024, 4096, 16384, 65536, 262144, 1 << 20]


def test_stream_matches_the_torch_reference(tiny_dir, tiny):
    torch = pytest.importorskip("torch")
    from mlx_ltc.reference import model as reference

    tokens = tokens_of(200, seed=4)
    ref = reference.load(tiny_dir, torch.float64)
    with torch.no_grad():
        logits = ref(input_ids=torch.as_tensor(tokens[None, :-1], dtype=torch.long)).logits[0]
        expected = torch.nn.functional.cross_entropy(logits, torch.as_tensor(tokens[1:]).long(), reduction="none")
    np.testing.assert_allclose(stream_nll(tiny, tokens, 256, 48), expected.numpy(), atol=1e-4)


def test_perplexity_is_token_weighted_over_real_targets(tiny):
    rows = [tokens_of(n, seed=n) for n in (40, 17, 33, 40)]
    split = data.Split.from_rows(rows)
    split.real[1, 3] = False  # a target that must not count
    split.weights[0, :] = 5.0  # role weights are for training, never for perplexity
    got = perplexity(tiny, split, batch_size=3, progress=False)
    nll = [one_shot_nll(tiny, r) for r in rows]
    nll[1] = np.delete(nll[1], 3)
    flat = np.concatenate(nll)
    assert got.tokens == len(flat)
    assert got.loss == pytest.approx(flat.mean(), abs=1e-5)
    assert got.ppl == pytest.approx(math.exp(flat.mean()), rel=1e-5)


def test_context_curve_against_per_window_one_shot(tiny):
    tokens = tokens_of(1100, seed=5)
    curve = context.context_curve(tiny, tokens, [128, 256], max_tokens=1024)
    assert curve.tokens == 1024 and curve.lengths == [128, 256]
    for length, ppl in zip(curve.lengths, curve.ppl):
        nll = np.concatenate([one_shot_nll(tiny, tokens[w : w + length]) for w in range(0, 1024, length)])
        assert ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    by_pos = np.mean([one_shot_nll(tiny, tokens[w : w + 256]) for w in range(0, 1024, 256)], axis=0)
    np.testing.assert_allclose(curve.position_nll, by_pos, atol=1e-5)
    assert [(b["start"], b["end"]) for b in curve.buckets] == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 255)]
    assert curve.buckets[-1]["nll"] == pytest.approx(by_pos[128:255].mean(), abs=1e-5)
    assert curve.buckets[-1]["targets"] == 4 * 127


def test_continuations_score_like_full_forward_passes(tiny):
    prompt = tokens_of(90, seed=6)
    conts = [[5, 9, 13], [7], [21, 22, 23, 24, 25]]
    got = qa.continuation_nll(tiny, prompt, conts)
    for c, nll in zip(conts, got):
        full = np.concatenate([prompt, c]).astype(np.int32)
        assert nll == pytest.approx(one_shot_nll(tiny, full)[-len(c) :].sum(), abs=1e-4)


def test_probe_rank_and_buckets(tiny, monkeypatch):
    rows = [
        {"id": 0, "kind": "defined_in", "distance": 300, "offset": 0, "length": 4,
         "answer_tokens": [1, 2], "distractor_tokens": [[3], [4]]},
        {"id": 1, "kind": "returns", "distance": 520, "offset": 4, "length": 4,
         "answer_tokens": [5], "distractor_tokens": [[6], [7], [8]]},
    ]  # fmt: skip
    fake = {0: [1.0, 3.0, 0.5], 1: [0.2, 0.9, 0.8, 0.7]}  # total NLL: answer first
    calls = iter(fake.values())
    monkeypatch.setattr(qa, "continuation_nll", lambda model, prompt, choices: next(calls))
    scores = qa.score(tiny, rows, np.zeros(8, dtype=np.int32), [256, 512])
    assert [(s.bucket, s.rank, s.answer_nll) for s in scores] == [(256, 2, 0.5), (512, 1, 0.2)]
    table = qa.by_bucket(scores)
    assert [(b["distance"], b["accuracy"], b["mrr"]) for b in table] == [(256, 0.0, 0.5), (512, 1.0, 1.0)]
    assert table[1]["chance"] == 0.25


def test_split_stream_drops_prefix_and_padding():
    split = data.Split.from_rows([np.array([9, 1, 2, 3], np.int32), np.array([9, 4, 5], np.int32)])
    split.real[:, 0] = False  # target 1 is the prefix's continuation here
    assert split_stream(split).tolist() == [2, 3, 5]


# end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("eval")
    files = {
        f"pkg/mod{i}.py": f"from pkg import mod{(i + 1) % 10}\n\n"
        + "".join(f"def func_{i}_{j}(value):\n    return value * {j} + {i}\n\n" for j in range(40))
        for i in range(10)
    }
    repo = write_files(root / "repo", files)
    run = root / "run"
    (root / "qa.yaml").write_text("data: {qa_max_len: 512}\n")  # probes 256+ tokens from their evidence
    proc = run_cli("train", "--repo", repo, "--out", run, "--model", "tiny-starcoder2", "--seq-len", "128",
                   "--max-steps", "4", "--config", root / "qa.yaml", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root, repo, run


def test_eval_writes_report_json_and_plots(trained_run):
    root, repo, run = trained_run
    out = root / "eval.json"
    proc = run_cli("eval", run, "--base", "--stream-corpus", repo, "--stream-tokens", "5000", "--windows", "64,128",
                   "--lengths", "64,256", "--context-tokens", "512", "--json", out, "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["models"] == ["base", "adapted"]
    streaming = result["streaming"]
    assert {(r["model"], r["window"]) for r in streaming} == {(m, w) for m in ("base", "adapted") for w in (64, 128)}
    lengths = sorted({r["tokens"] for r in streaming})
    assert lengths == [1024, 4096, 5000] and result["stream_source"]["tokens"] == 5000
    assert all(set(r) >= {"tokens", "window", "nll", "peak_bytes"} and r["nll"] > 0 for r in streaming)
    assert json.loads((run / "report.json").read_text())["eval"] == result
    for m in result["models"]:
        assert result["perplexity"][m]["test"]["tokens"] > 0
        assert result["context"][m]["lengths"] == [64, 256]
        assert result["qa"][m]["probes"], "the probes of the test split were scored"
    assert result["perplexity"]["base"]["val"]["ppl"] != result["perplexity"]["adapted"]["val"]["ppl"]
    report = (run / "report.md").read_text()
    for heading in ("## Perplexity", "## Context use", "## Repo QA", "## Streaming"):
        assert heading in report
    written = json.loads((run / "report.json").read_text())
    loaded = Report.from_json(written)  # train's report and the evaluation, as records
    assert loaded.to_json() == written and markdown(loaded, run.name) == report
    for name in ("training", "loss_vs_position", "ppl_vs_length", "qa_vs_distance", "memory"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000

    proc = run_cli("eval", "--compare", run, run, "--json", root / "cmp.json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((root / "cmp.json").read_text())["rows"]
    classic = [r for r in rows if r["metric"] != "completion B - A"]
    assert classic and all(r["ratio"] == pytest.approx(1.0) for r in classic)
    same = [r for r in rows if r["metric"] == "completion B - A"]  # train's report completed lines too
    assert same and all(r["em"] == 0 and r["es"] == 0 for r in same)
    assert "test perplexity" in proc.stdout


@pytest.mark.slow
def test_eval_streams_the_test_split_by_default(trained_run):
    root, repo, run = trained_run
    out = root / "split.json"
    proc = run_cli("eval", run, "--stream-tokens", "0", "--windows", "64", "--lengths", "64", "--context-tokens",
                   "128", "--json", out, "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    test_tokens = len(split_stream(data.load_split(run / "data", "test")))
    assert result["stream_source"]["kind"] == "test split" and result["stream_source"]["tokens"] == test_tokens
    assert result["models"] == ["adapted"] and result["streaming"][-1]["tokens"] == test_tokens


@pytest.mark.slow
def test_eval_bad_input_is_one_clear_line(trained_run, tmp_path):
    root, repo, run = trained_run

    def fails(*args, message):
        proc = run_cli("eval", *args)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr

    fails(tmp_path / "nope", message="does not exist")
    fails(repo, message="not an mlx-ltc run directory")
    fails(message="give a run directory")
    fails("--compare", run, tmp_path, message="has no evaluation yet")
    fails(run, "--stream-corpus", tmp_path / "nope", message="not a directory")

    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "adapters" / "adapters.safetensors").unlink()
    fails(copy, message="has no adapters")

    copy = tmp_path / "foreign"
    shutil.copytree(run, copy)
    meta = json.loads((copy / "data" / "metadata.json").read_text())
    meta["tokenizer_hash"] = "0" * 16
    (copy / "data" / "metadata.json").write_text(json.dumps(meta))
    fails(copy, message="built with another tokenizer")

    copy = tmp_path / "empty"
    shutil.copytree(run, copy)
    (copy / "data" / "test.bin").write_bytes(b"")
    (copy / "data" / "test.jsonl").write_text("")
    fails(copy, message="the test split is empty")

    copy = tmp_path / "corrupt"
    shutil.copytree(run, copy)
    (copy / "adapters" / "adapters.safetensors").write_bytes(b"not a safetensors file")
    fails(copy, "--stream-tokens", "600", "--windows", "64", "--lengths", "64", "--context-tokens", "128",
          message="cannot load")  # fmt: skip
