"""`mlx-ltc mc train` / `mc eval` end to end on a small repository with the embedded model, and the pieces
the evaluation relies on (the identifier mask, the streamed focus loop)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_megacontext_context import covered
from test_megacontext_positions import tiny_llama

from mlx_ltc.cli import cli
from mlx_ltc.config import McTrainConfig
from mlx_ltc.errors import UserError
from mlx_ltc.research.megacontext import context as wc
from mlx_ltc.research.megacontext import lens
from mlx_ltc.research.megacontext.run import LEGACY, identifier_mask, load_run, run_settings, stream_focus
from mlx_ltc.research.megacontext.tree import mean_gist


def test_identifier_mask_marks_names_defined_only_in_the_truncated_head():
    text = "def alpha():\n    pass\n\nbeta = 1\n# filler filler filler\nx = alpha() + beta\n"
    starts = [0, 4, 9, 12, 13, 17, 22, 23, 24, 28, 33, 40, 47, 54, 55, 57, 59, 64, 66, 68, 71]
    tokens = list(range(len(starts)))
    f = {"text": text, "byte_starts": starts, "tokens": tokens, "definitions": [("alpha", 0), ("beta", 24)]}
    n_history = 15  # history ends at byte 55 ("x = ..." is the target)
    mask = identifier_mask(f, n_history, budget=11)  # head: bytes [0, 13): alpha only; the kept part mentions beta
    target_starts = np.array(starts[n_history:])
    marked = {int(s) for s in target_starts[mask]}
    alpha_at = text.index("alpha()", 55)
    assert marked and all(alpha_at <= s < alpha_at + 5 or (s < alpha_at and s + 5 > alpha_at) for s in marked)
    assert not identifier_mask(f, n_history, budget=15).any()  # nothing truncated, nothing counts


def test_the_streamed_focus_loop_stays_within_budget_and_tiles_the_timeline():
    model = tiny_llama()
    tokens = np.random.default_rng(0).integers(0, 101, 1500).astype(np.int32)
    net = lens.LensNet(width=64, hidden=32, layers=1, heads=4)
    gist = mean_gist(np.array(model.model.embed_tokens.weight))
    tree, entries, telemetry = stream_focus(net, gist, tokens, budget=256, width=64)
    assert covered(tree, entries) == len(tokens) // 32 * 32 and wc.cost(tree, entries) <= 256
    assert telemetry["blocks"] == len(tokens) // 32 - 256 // 32
    assert telemetry["forced"] > 0 and telemetry["swap_rate"] >= 0 and telemetry["ms_per_block"] > 0


def small_repo(root: Path) -> Path:
    stdlib = Path(os.__file__).parent
    files = sorted(p for p in stdlib.glob("*.py") if 2500 <= p.stat().st_size <= 6000)[:10]
    root.mkdir()
    for p in files:
        shutil.copy(p, root / p.name)
    return root


@pytest.mark.slow
def test_mc_train_then_eval_end_to_end(tmp_path):
    repo, out = small_repo(tmp_path / "repo"), tmp_path / "run"
    runner = CliRunner()
    args = ["mc", "train", "--repo", str(repo), "--out", str(out), "--max-steps", "2", "--cycles", "1",
            "--lens-contexts", "1", "--budget", "128", "--horizon", "16", "--split", "40/20/40", "--quiet",
            "--encoder", "both", "--autoencode-steps", "1"]  # fmt: skip
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["cycle1-gist", "cycle1-lens", "cycle1-lora"]
    assert {p.name for p in (out / "checkpoints").iterdir()} == set(state["done"])
    assert (out / "checkpoints" / "cycle1-lora" / "lora.safetensors").exists()
    for phase in ("gist", "lora"):  # both encoders; the reading LoRA from the encoder phase on
        assert {"gistnet", "encoder", "lora"} <= {p.stem for p in (out / "checkpoints" / f"cycle1-{phase}").iterdir()}
    encoder_rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                    if r.get("encoder") == "base-lora"]  # fmt: skip
    assert "kl" not in encoder_rows[0] and {"ae_acc", "kl", "contrast_gap"} <= set(
        encoder_rows[1]
    )  # autoencoding first
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    telemetry = state["telemetry"][0]
    assert set(telemetry["loss_at_h"]) == {"64", "128", "256"} and telemetry["swap_rate"] >= 0

    again = runner.invoke(cli, args)  # finished: nothing to redo
    assert again.exit_code == 0 and "cycle1-gist:" not in again.output

    rows_path = tmp_path / "rows.json"
    evaluate = ["mc", "eval", str(out), "--json", str(rows_path), "--budgets", "64,128", "--horizon", "16",
                "--min-tokens", "200", "--max-tokens", "100000", "--max-files", "2", "--quiet"]  # fmt: skip
    result = runner.invoke(cli, evaluate)
    assert result.exit_code == 0, result.output
    rows = json.loads(rows_path.read_text())
    plain = [r for r in rows if "@" not in r["condition"]]
    conditions = {"truncation", "mean_gist", "last_input", "gist", "gist_lora", "full", "shuffled", "other_file",
                  "zeroed", "lens", "gist_compact"}  # fmt: skip
    assert {(r["budget"], r["condition"]) for r in plain} == {(w, c) for w in (64, 128) for c in conditions}
    for r in rows:
        assert r["ci_low"] <= r["nll"] <= r["ci_high"] and np.isfinite(r["nll"])
    for r in plain:  # the paired fraction of the truncation -> full gap closed, with its CI
        assert len(r["gap_ci"]) == 2 and np.isfinite(r["gap_closed"])
        if r["condition"] in ("truncation", "full"):
            assert r["gap_closed"] == {"truncation": 0.0, "full": 1.0}[r["condition"]]
    by = {(r["budget"], r["condition"]): r["nll"] for r in plain}
    assert by[(64, "full")] == by[(128, "full")]
    report = (out / "eval.json").read_bytes()
    rebuilt = json.loads(report)["reconstruction"]
    assert set(rebuilt) == {"mean_gist", "last_input", "gist", "gist_lora", "shuffled", "no_gist"}
    assert all(0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1 for r in rebuilt.values())

    base_rows = tmp_path / "base.json"  # --base: the LoRA left out; its own report, the LoRA run's kept
    result = runner.invoke(cli, [*evaluate[:4], str(base_rows), "--budgets", "64", *evaluate[7:], "--base"])
    assert result.exit_code == 0, result.output
    assert (out / "eval.json").read_bytes() == report
    assert json.loads((out / "eval-base.json").read_text())["base_only"] is True
    base = {(r["budget"], r["condition"]): r["nll"] for r in json.loads(base_rows.read_text())}
    assert base[(64, "truncation")] != by[(64, "truncation")]  # one LoRA update moved the model

    # damage: a corrupt checkpoint and an unfinished run each give one clear line, no traceback
    (out / "checkpoints" / "cycle1-lora" / "lensnet.safetensors").write_bytes(b"not a safetensors file")
    result = runner.invoke(cli, evaluate)
    assert result.exit_code != 0 and "damaged" in result.output and "Traceback" not in result.output
    state["done"] = state["done"][:2]
    (out / "state.json").write_text(json.dumps(state))
    result = runner.invoke(cli, evaluate)
    assert result.exit_code != 0 and "unfinished" in result.output
    (out / "state.json").write_text("{not json")
    result = runner.invoke(cli, evaluate)
    assert result.exit_code != 0 and "damaged" in result.output and "Traceback" not in result.output


def test_bad_input_is_one_clear_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["mc", "train", "--repo", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    (tmp_path / "f").write_text("x")
    result = runner.invoke(cli, ["mc", "train", "--repo", str(tmp_path), "--out", str(tmp_path / "f")])
    assert result.exit_code != 0 and "is a file" in result.output
    result = runner.invoke(
        cli, ["mc", "train", "--repo", str(tmp_path), "--out", str(tmp_path / "o"), "--l2-steps", "5"]
    )
    assert result.exit_code != 0 and "the base-lora encoder's L2 gist is its last L1 gist" in result.output
    assert not (tmp_path / "o").exists()
    result = runner.invoke(
        cli, ["mc", "train", "--repo", str(tmp_path), "--out", str(tmp_path / "o"), "--encoder", "x"]
    )
    assert result.exit_code != 0 and "'x' is not one of 'base-lora', 'gistnet', 'both'" in result.output
    result = runner.invoke(cli, ["mc", "eval", str(tmp_path), "--json", str(tmp_path / "rows.json")])
    assert result.exit_code != 0 and "not a MegaContext run" in result.output
    assert not (tmp_path / "rows.json").exists()


def test_a_run_written_before_the_config_sections_compares_equal_and_loads(tmp_path):
    """state.json's settings as `mc train --repo R` wrote them before the options became config sections (and
    before the base-LoRA encoder)."""
    old = {"repo": str(tmp_path.resolve()), "model": "smollm2-135m", "split": "85/10/5", "cycles": 2, "max_steps": 60,
           "lens_contexts": 6, "lens_candidates": 12, "budget": 512, "horizon": 64, "blocks": 8, "keep": 2, "batch": 2,
           "lr": 0.001, "contrast": 1.0, "l2_steps": 0, "lora_rank": 4, "lora_layers": 4, "lora_lr": 0.0002,
           "seed": 0}  # fmt: skip
    assert run_settings(tmp_path, McTrainConfig(encoder="gistnet")) == {**LEGACY, **old}  # it was a GistNet run
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"settings": old, "done": ["cycle1-gist"], "telemetry": []}))
    with pytest.raises(UserError, match="training is unfinished"):  # the settings read; the phases are checked next
        load_run(out)
