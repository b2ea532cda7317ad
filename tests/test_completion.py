"""The repo code-completion benchmark: which lines are targets, the prompts they get, generation with a
reused KV cache, the metrics and their intervals; then `mlx-ltc eval --completion` end to end."""

import json

import numpy as np
import pytest
from conftest import run_cli, write_files

from mlx_ltc import data, models
from mlx_ltc.config import DataConfig
from mlx_ltc.data.metadata import DatasetMeta
from mlx_ltc.errors import UserError
from mlx_ltc.eval import completion
from mlx_ltc.eval import targets as tg
from mlx_ltc.eval.report import markdown
from mlx_ltc.eval.results import Report
from mlx_ltc.run import summary

SHAPES = '''"""Shapes."""
import math


class Circle:
    def __init__(self, radius):
        self.radius = radius

    def area(self):
        return math.pi * self.radius ** 2


def unit_circle():
    return Circle(1.0)
'''

DRAW = '''"""Drawing."""
from pkg.shapes import Circle, unit_circle

# Draw things.
def draw(radius):
    shape = Circle(radius)
    total = shape.area() + 1
    return total


def draw_unit():
    """Unit."""
    return unit_circle().area()
'''


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return models.load_tokenizer(smollm2_dir)


@pytest.fixture
def corpus(tmp_path, tokenizer):
    repo = write_files(tmp_path / "repo", {"pkg/__init__.py": "", "pkg/shapes.py": SHAPES, "pkg/draw.py": DRAW})
    return data.Corpus(data.scan(repo), tokenizer, DataConfig(), log=lambda m: None, progress=False)


def by_text(corpus, path):
    return {c[1].strip(): c for c in tg.candidates(corpus, path)}


def test_targets_are_code_lines_and_cross_file_ones_use_an_imported_name(corpus):
    lines = by_text(corpus, "pkg/draw.py")
    assert set(lines) == {"def draw(radius):", "shape = Circle(radius)", "total = shape.area() + 1", "return total",
                          "def draw_unit():", "return unit_circle().area()"}  # fmt: skip
    assert {text: c[2] for text, c in lines.items() if c[2]} == {
        "shape = Circle(radius)": ("Circle",),
        "total = shape.area() + 1": ("area",),  # a method of an imported class, not a common name
        "return unit_circle().area()": ("area", "unit_circle"),
    }
    text = DRAW.encode()
    for line, (number, target, _, cut, end) in lines.items():
        assert text.split(b"\n")[number].decode() == target and text[end : end + 1] == b"\n"
        before = text[:cut].decode()
        assert before.rstrip() == before and before.split("\n")[-1].strip()  # ends on the last non-blank line
        assert text[cut:end].decode().strip() == line
    assert tg.cross_file_names(corpus, "pkg/shapes.py") == {}  # `import math` is not a repo file


def test_selection_is_seeded_balanced_and_capped(corpus):
    usable = {"test": ["pkg/draw.py"], "val": ["pkg/shapes.py"]}
    first = tg.select(corpus, usable, 6, seed=3, min_files=1)
    assert first.targets == tg.select(corpus, usable, 6, seed=3, min_files=1).targets
    kinds = [t.kind for t in first.targets]
    assert kinds.count(tg.CROSS) == 3 and kinds.count(tg.RANDOM) == 3
    assert len({(t.path, t.line) for t in first.targets}) == 6  # a line is drawn once
    assert first.splits == ["test"] and not first.notes
    more = tg.select(corpus, usable, 8, seed=3, min_files=1)
    assert more.splits == ["test", "val"]  # the test split alone holds too few cross-file lines
    assert sum(t.kind == tg.CROSS for t in more.targets) == 3 and more.notes == [
        "3 cross file lines (of 4 asked): the held-out files hold no more"
    ]
    assert {t.path for t in more.targets if t.kind == tg.RANDOM} == {"pkg/draw.py", "pkg/shapes.py"}
    capped = tg.select(corpus, {"test": ["pkg/draw.py"], "val": []}, 6, seed=3, per_file=2, min_files=1)
    assert [t.kind for t in capped.targets].count(tg.CROSS) == 2 and "of 3 asked" in capped.notes[0]
    few = tg.select(corpus, usable, 6, seed=3, min_files=2)  # enough lines, too few files: val joins
    assert few.splits == ["test", "val"] and {t.path for t in few.targets} == {"pkg/draw.py", "pkg/shapes.py"}
    assert not few.notes
    rough = tg.select(corpus, usable, 6, seed=3, min_files=3)
    assert rough.notes == ["targets from 2 files only: intervals from a bootstrap over so few files are rough"]
    with pytest.raises(UserError, match="at least 2"):
        tg.select(corpus, usable, 1)


def decode(tokenizer, ids):
    return tokenizer.decode(list(ids))


def test_prompts_are_the_training_format_within_the_budget(corpus, tokenizer):
    prompter = tg.Prompter(corpus)
    line = by_text(corpus, "pkg/draw.py")["total = shape.area() + 1"]
    target = tg.Target("pkg/draw.py", line[0], tg.CROSS, line[1], line[2], line[3], line[4])
    head, file = corpus.markers.repo_header("repo"), corpus.markers.file_header
    alone = prompter.build(target, "in_file", 4096)
    assert decode(tokenizer, alone.tokens) == head + file("pkg/draw.py") + DRAW[: line[3]]
    whole = corpus.infos["pkg/draw.py"].tokens
    assert alone.tokens[-alone.in_file :].tolist() == whole[: alone.in_file].tolist()  # training's own tokens
    assert alone.cross_file == 0

    short = prompter.build(target, "in_file", 30)
    assert len(short.tokens) <= 30 and short.in_file < alone.in_file
    kept = decode(tokenizer, short.tokens[-short.in_file :])
    assert DRAW[: line[3]].endswith(kept) and (kept.startswith("\n") or DRAW[: line[3]].endswith("\n" + kept))

    crossed = prompter.build(target, "cross_file", 4096, others=4000)
    expected = head + file("pkg/shapes.py") + SHAPES + file("pkg/draw.py") + DRAW[: line[3]]
    assert decode(tokenizer, crossed.tokens) == expected
    assert crossed.cross_file == len(crossed.tokens) - len(alone.tokens)
    cut = prompter.build(target, "cross_file", 4096, others=40)  # the dependency's head, whole lines
    dep = decode(tokenizer, cut.tokens)[len(head) : -len(file("pkg/draw.py") + DRAW[: line[3]])]
    shapes = file("pkg/shapes.py")
    assert 0 < cut.cross_file <= 40 and dep.startswith(shapes) and SHAPES.startswith(dep[len(shapes) :])
    assert dep.endswith("\n")
    assert prompter.build(target, "cross_file", 4096, others=10).cross_file == 0  # too little room for a head
    assert prompter.build(target, "in_file", 8) is None  # the headers alone exceed it


def built_with(**files_by_split) -> DatasetMeta:
    """The metadata of a dataset at 256 tokens with these files in its splits."""
    return DatasetMeta(seq_len=256, dtype="uint16", tokenizer_hash="", splits={}, files_by_split=files_by_split)


def test_a_files_targets_share_their_cross_file_part(corpus):
    meta = built_with(test=["pkg/draw.py"], val=[], train=["pkg/shapes.py"])
    opts = completion.CompletionOptions(targets=6, budgets=(64, 4096), modes=("in_file", "cross_file"))
    bench = completion.Benchmark.build(corpus, meta, opts, log=lambda m: None)
    prompts = {b: [bench.prompts[(i, "cross_file", b)] for i in range(len(bench.targets.targets))] for b in (64, 4096)}
    for a, b in zip(prompts[4096], prompts[4096][1:]):  # in line order each prompt extends the one before
        assert len(b.tokens) > len(a.tokens) and b.tokens[: len(a.tokens)].tolist() == a.tokens.tolist()
    assert {p.cross_file for p in prompts[4096]} == {len(corpus.infos["pkg/shapes.py"].tokens) + 7}
    assert all(len(p.tokens) <= 64 and p.cross_file == 0 for p in prompts[64])  # the file's text fills it
    with pytest.raises(UserError, match="no <fim_prefix>"):
        completion.Benchmark.build(corpus, meta, completion.CompletionOptions(modes=("fim",)), log=lambda m: None)
    with pytest.raises(UserError, match="at least 64"):
        completion.Benchmark.build(corpus, meta, completion.CompletionOptions(budgets=(32,)), log=lambda m: None)
    with pytest.raises(UserError, match="no held-out source files"):
        meta_none = built_with(test=[], val=[], train=[])
        completion.Benchmark.build(corpus, meta_none, opts, log=lambda m: None)


def test_fim_prompt_puts_the_suffix_before_the_middle(corpus, tokenizer):
    import dataclasses

    markers = dataclasses.replace(corpus.markers, fim=(7, 8, 9))  # stand-ins for the three FIM ids
    corpus.markers = markers
    prompter = tg.Prompter(corpus)
    line = by_text(corpus, "pkg/draw.py")["total = shape.area() + 1"]
    target = tg.Target("pkg/draw.py", line[0], tg.CROSS, line[1], line[2], line[3], line[4])
    p = prompter.build(target, "fim", 4096).tokens.tolist()
    pre, suf, mid = p.index(7), p.index(8), p.index(9)
    assert pre < suf < mid == len(p) - 1
    assert decode(tokenizer, p[pre + 1 : suf]) == DRAW[: line[3]]
    assert DRAW[line[4] :].startswith(decode(tokenizer, p[suf + 1 : mid]))


def test_first_line_and_scores():
    assert completion.first_line("\n    x = 1\n    y") == ("    x = 1", True)
    assert completion.first_line("\n\n  \n    x = f(") == ("    x = f(", False)
    assert completion.first_line("  # still the previous line") == ("", False)
    s = completion.score("    total = shape.area()  + 1", "total = shape.area() + 1")
    assert s == {"em": 1.0, "es": 1.0, "id_em": 1.0, "id_f1": 1.0}
    s = completion.score("return unit_circle().area()", "return unit_circle()")
    assert s["em"] == 0.0 and 0.5 < s["es"] < 1 and s["id_em"] == 0.0
    assert s["id_f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # precision 1/1, recall 1/2; `return` is a keyword
    assert completion.score("x = 1", "")["id_f1"] == 0.0 and completion.score("{}", "")["id_f1"] == 1.0


def test_bootstrap_intervals_resample_files():
    rng = np.random.default_rng(0)
    mean, ci = completion.bootstrap(np.ones(10), np.array(["a"] * 5 + ["b"] * 5), 200, rng)
    assert mean == 1.0 and ci == [1.0, 1.0]
    values = np.array([1.0] * 5 + [0.0] * 5)
    _, by_file = completion.bootstrap(values, np.array(["a"] * 5 + ["b"] * 5), 2000, rng)
    _, by_target = completion.bootstrap(values, np.arange(10).astype(str), 2000, rng)
    assert by_file == [0.0, 1.0]  # two files: each resample is all of one, all of the other, or both
    assert by_file[1] - by_file[0] > by_target[1] - by_target[0] > 0


def test_reusing_the_cache_gives_what_fresh_generation_gives(corpus, tiny_dir):
    loaded = models.load(tiny_dir)
    meta = built_with(test=["pkg/draw.py"], val=["pkg/shapes.py"], train=[])
    opts = completion.CompletionOptions(targets=8, budgets=(64, 4096), modes=("in_file", "cross_file"))
    bench = completion.Benchmark.build(corpus, meta, opts, log=lambda m: None)
    prompts = [bench.prompts[k].tokens for k in bench.order()]
    tally = __import__("collections").Counter()
    reused = completion.generate(loaded.model, loaded.tokenizer, prompts, 6, tally=tally)
    fresh = [completion.generate(loaded.model, loaded.tokenizer, [p], 6)[0] for p in prompts]
    assert reused == fresh
    assert tally["reused"] > tally["prefilled"] / 2  # the prompts of a file share most of their tokens


def test_adapters_off_is_the_base_model(tiny_dir):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map

    from mlx_ltc.train.lora import adapters_off, apply_lora
    from mlx_ltc.config import LoraConfig

    loaded = models.load(tiny_dir)
    x = mx.array([[1, 5, 9, 200, 7]])
    base = loaded.model(x)
    apply_lora(loaded.model, LoraConfig(rank=4))
    loaded.model.update(tree_map(lambda p: p + 0.05, loaded.model.trainable_parameters()))
    assert any(n.endswith("lora_b") for n, _ in tree_flatten(loaded.model.trainable_parameters()))
    adapted = loaded.model(x)
    assert not mx.allclose(adapted, base)
    with adapters_off(loaded.model):
        assert mx.array_equal(loaded.model(x), base)
    assert mx.array_equal(loaded.model(x), adapted)


# end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("completion")
    files = {"pkg/__init__.py": ""}
    for i in range(12):
        dep = f"from pkg.mod{(i + 1) % 12} import helper_{(i + 1) % 12}\n\n" if i else ""
        body = "".join(
            f"def fn_{i}_{j}(value):\n    total = helper_{(i + 1) % 12}(value) + {j}\n    return total\n\n"
            for j in range(20)
        )
        files[f"pkg/mod{i}.py"] = dep + f"def helper_{i}(value):\n    return value * {i}\n\n" + body
    repo = write_files(root / "repo", files)
    run = root / "run"
    (root / "cfg.yaml").write_text("eval: {completion_targets: 8, forgetting_tokens: 1024}\n")
    proc = run_cli("train", "--repo", repo, "--out", run, "--model", "tiny-starcoder2", "--seq-len", "128",
                   "--max-steps", "2", "--config", root / "cfg.yaml", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root, repo, run, proc


def test_train_reports_files_chains_forgetting_and_completion(trained):
    root, repo, run, proc = trained
    report = json.loads((run / "report.json").read_text())
    for model in ("base", "adapted"):
        r = report[model]
        assert r["file_tokens"] == r["val_tokens"] and r["file_ppl"] == pytest.approx(r["val_ppl"])  # no history
        assert r["chain_ppl"] is None and r["chain_tokens"] == 0
    assert report["forgetting"]["tokens"] == 1024 and report["forgetting"]["base"]["ppl"] > 1
    rows = report["completion"]
    assert {(r["model"], r["mode"], r["budget"]) for r in rows} >= {
        ("base", "in_file", 128),
        ("adapted", "in_file", 128),
    }
    assert sum(report["completion_info"]["targets"].values()) == 8
    first = proc.stdout.splitlines()[0]
    assert first.startswith("fine-tuned tiny-starcoder2 on repo: held-out files' perplexity base ")
    assert "exact match on held-out cross-file lines: base" in proc.stdout and "outside the repo" in proc.stdout
    records = [json.loads(x) for x in (run / "completion.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all("base/in_file/128" in r["outputs"] for r in records)
    loaded = Report.from_json(report)  # as a record, it writes the same JSON and the same summary
    assert loaded.to_json() == report and summary(loaded.training) == (run / "summary.txt").read_text()


@pytest.mark.slow
def test_eval_completion_writes_rows_records_table_and_plot(trained):
    root, repo, run, _ = trained
    out = root / "completion.json"
    proc = run_cli("eval", run, "--completion", "--base", "--completion-targets", "6", "--completion-lengths", "64,256",
                   "--json", out, "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["completion"]
    keys = {"model", "mode", "budget", "kind", "targets", "em", "em_ci", "es", "id_f1"}
    assert rows and all(
        keys <= set(r) and 0 <= r["em"] <= 1 and r["em_ci"][0] <= r["em"] <= r["em_ci"][1] for r in rows
    )
    assert {r["budget"] for r in rows} == {64, 256} and {r["model"] for r in rows} == {"base", "adapted"}
    assert {r["mode"] for r in rows} == {"in_file", "cross_file"}
    ev = json.loads((run / "report.json").read_text())["eval"]
    assert ev["completion"] == rows and ev["completion_paired"]
    assert "## Completion of held-out code" in (run / "report.md").read_text()
    written = json.loads((run / "report.json").read_text())
    loaded = Report.from_json(written)
    assert loaded.to_json() == written and markdown(loaded, run.name) == (run / "report.md").read_text()
    assert (run / "plots" / "completion.png").stat().st_size > 10_000
    assert len((run / "eval_completion.jsonl").read_text().splitlines()) == 6
    assert len((run / "completion.jsonl").read_text().splitlines()) == 8  # train's records stay

    proc = run_cli("eval", "--compare", run, run, "--json", root / "cmp.json")
    assert proc.returncode == 0, proc.stderr
    same = [r for r in json.loads((root / "cmp.json").read_text())["rows"] if r["metric"] == "completion B - A"]
    assert same and all(r["em"] == 0 and r["em_ci"] == [0, 0] for r in same)
    assert "B - A on the same lines" in proc.stdout

    def fails(*args, message):
        proc = run_cli("eval", run, "--completion", *args)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    fails("--completion-modes", "fim", message="no <fim_prefix>")
    fails("--completion-modes", "oracle", message="unknown oracle")
    fails("--completion-lengths", "32", message="at least 64 tokens")
    import shutil

    moved = root / "moved"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["repo"] = str(root / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    proc = run_cli("eval", moved, "--completion")
    assert proc.returncode != 0 and "is gone" in proc.stderr and "Traceback" not in proc.stderr
