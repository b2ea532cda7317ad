"""report.json as records: every report reads back to the same mapping, older ones (without the newer
keys) included, and renders as it did when report.json was read as a plain dict. The expected report.md,
summary and `eval --compare` texts in fixtures/report/expected were rendered by that dict-reading code."""

import json
import shutil
from pathlib import Path

import pytest

from mlx_ltc import run
from mlx_ltc.eval import report
from mlx_ltc.eval.results import Evaluation, Report, TrainReport

FIXTURES = Path(__file__).parent / "fixtures" / "report"
EXPECTED = FIXTURES / "expected"
# new: every section; new_adapted_only: eval without --base; old_classic / old_completion: train's report
# without forgetting, completion, notes, mix or perplexity by kind, and an eval section of only one kind
# (no by_kind, no forgetting, no QA accuracy / no with_context, no paired rows); eval_only: no train report.
NAMES = ("new", "new_adapted_only", "old_classic", "old_completion", "eval_only")


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_a_report_reads_back_to_the_same_json(name):
    data = fixture(name)
    assert Report.from_json(data).to_json() == data
    if "model" in data:
        train = {k: v for k, v in data.items() if k != "eval"}
        assert TrainReport.from_json(train).to_json() == train


def test_older_reports_leave_the_newer_fields_empty():
    old = Report.from_json(fixture("old_classic"))
    t, ev = old.training, old.evaluation
    assert t.forgetting is None and t.completion is None and t.notes is None and t.data.mix is None
    assert t.base.file_tokens is None and t.train.curriculum is None
    assert ev.forgetting is None and ev.completion is None and ev.qa["adapted"].accuracy is None
    assert ev.perplexity["adapted"]["val"].kind("file") is None and ev.stream_source.files is None
    assert Report.from_json(fixture("eval_only")).training is None


@pytest.mark.parametrize("name", NAMES)
def test_report_md_and_summary_render_as_before(name):
    loaded = Report.from_json(fixture(name))
    assert report.markdown(loaded, "run") == (EXPECTED / f"{name}.md").read_text()
    if loaded.training:
        assert run.summary(loaded.training) == (EXPECTED / f"{name}.summary.txt").read_text()


@pytest.mark.parametrize(
    "a, b",
    [("new", "new"), ("new", "old_classic"), ("old_classic", "new_adapted_only"), ("old_completion", "eval_only")],
)
def test_compare_renders_as_before(tmp_path, a, b):
    for name in (a, b):
        (tmp_path / name).mkdir(exist_ok=True)
        shutil.copy(FIXTURES / f"{name}.json", tmp_path / name / "report.json")
    text, rows = report.compare(tmp_path / a, tmp_path / b)
    assert text.replace(str(tmp_path), "RUNS") == (EXPECTED / f"compare_{a}_{b}.md").read_text()
    json.dumps(rows)  # what --json writes


def test_write_merges_one_kind_of_evaluation_beside_the_other(tmp_path):
    """Perplexity and the rest replace all of their old entries; the completion benchmark's are kept
    beside them, and the other way round. Older reports plot as well as new ones."""
    new = fixture("new")
    classic = fixture("old_classic")["eval"]
    completion = fixture("old_completion")["eval"]
    shutil.copy(FIXTURES / "new.json", tmp_path / "report.json")
    report.write(tmp_path, Evaluation.from_json(classic))
    completion_part = {k: v for k, v in new["eval"].items() if k.startswith("completion")}
    assert json.loads((tmp_path / "report.json").read_text())["eval"] == {**completion_part, **classic}
    report.write(tmp_path, Evaluation.from_json(completion))
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["eval"] == {**completion_part, **classic, **completion} and written["model"] == new["model"]
    for name in ("loss_vs_position", "ppl_vs_length", "qa_vs_distance", "memory", "completion"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    fresh = tmp_path / "fresh"  # no report.json yet
    fresh.mkdir()
    report.write(fresh, Evaluation.from_json(completion))
    assert json.loads((fresh / "report.json").read_text()) == {"eval": completion}
