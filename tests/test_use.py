"""Using a run: `mlx-ltc complete` builds the benchmark's prompt at a point of a file and continues it
with mlx-lm's generation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from test_completion import DRAW, by_text, corpus, tokenizer  # noqa: F401 (fixtures)

from mlx_ltc.errors import UserError
from mlx_ltc.eval import targets as tg
from mlx_ltc.use.complete import Session, position
from mlx_ltc.use.prompts import prompt_at


def test_the_point_of_a_line_an_offset_or_the_end():
    text = "a\nbb\né\n"
    assert [position(text, line=n) for n in (1, 2, 3, 4)] == [0, 1, 4, 7]  # the end of the line before
    assert position(text) == len(text.encode()) and position(text, at=2) == 2
    for kwargs, message in [
        ({"line": 5}, r"--line 5 is outside the file \(lines 1 to 4\)"),
        ({"at": 99}, r"--at 99 is outside the file \(0 to 8 bytes\)"),
        ({"at": 6}, "inside a UTF-8 character"),
        ({"line": 1, "at": 0}, "--line or --at, not both"),
    ]:
        with pytest.raises(UserError, match=message):
            position(text, **kwargs)
    assert position("no newline", line=2) == len("no newline")  # a new line after the last


def test_completing_a_line_gets_the_benchmarks_prompt_for_it(corpus):  # noqa: F811
    prompter = tg.Prompter(corpus)
    line = by_text(corpus, "pkg/draw.py")["total = shape.area() + 1"]
    target = tg.Target("pkg/draw.py", line[0], tg.CROSS, line[1], line[2], line[3], line[4])
    at = position(DRAW, line=line[0] + 1)  # --line is 1-based
    assert at == target.cut
    prompt, mode = prompt_at(prompter, "pkg/draw.py", at, 4096)
    in_file = prompter.in_file(target, 4096)
    expected = prompter.build(target, "cross_file", 4096, others=4096 - len(prompter.repo) - len(in_file))
    assert mode == "cross_file" and prompt.tokens.tolist() == expected.tokens.tolist()
    assert prompt.cross_file > 0  # pkg/shapes.py, which draw.py imports, is in it
    small, _ = prompt_at(prompter, "pkg/draw.py", at, 64)
    assert len(small.tokens) <= 64 and small.cross_file == 0
    with pytest.raises(UserError, match="can't hold the headers"):
        prompt_at(prompter, "pkg/draw.py", at, 8)


@pytest.mark.slow
def test_complete_is_mlx_lms_greedy_generation_of_the_prompt(tiny_run, cache_dir):
    from mlx_lm.generate import generate

    repo, run = tiny_run
    session = Session(run, cache_dir=cache_dir, log=lambda m: None)
    path = session.path_of(repo / "pkg" / "mod2.py")  # a real path works as well as a repository one
    at = position(session.prompter.corpus.texts[path], line=5)
    done = session.complete(path, at, max_tokens=12)
    prompt, _ = prompt_at(session.prompter, path, at, 128 - 12)
    reference = generate(session.loaded.model, session.loaded.tokenizer, prompt.tokens.tolist(), max_tokens=12)
    assert done.text == reference and (done.model, done.path, done.mode) == ("adapted", "pkg/mod2.py", "cross_file")
    assert done.prompt_tokens == len(prompt.tokens) <= 116 and done.cross_file_tokens > 0 and done.tokens <= 12
    assert session.complete(path, at, max_tokens=12).text == done.text  # greedy: the same again


@pytest.mark.slow
def test_complete_command_prints_json_and_bad_input_is_one_line(tiny_run, tmp_path):
    repo, run = tiny_run
    proc = run_cli("complete", run, "--file", "pkg/mod1.py", "--line", "4", "--max-tokens", "8", "--json", "--base")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert (done["model"], done["path"], done["at"]) == (
        "base",
        "pkg/mod1.py",
        len("from pkg import mod2\n\ndef func_1_0(value):"),
    )
    assert done["tokens"] <= 8 and done["stopped"] in ("end", "max_tokens")
    for args, message in [
        ((tmp_path / "nowhere", "--file", "a.py"), "run directory does not exist"),
        ((run, "--file", "pkg/none.py"), "--file pkg/none.py: no such file in the repository"),
        ((run, "--file", "pkg/mod1.py", "--line", "2", "--at", "3"), "give --line or --at, not both"),
        ((run, "--file", "pkg/mod1.py", "--max-tokens", "100"), "--max-tokens 100 leaves 28 of the 128-token context"),
    ]:
        proc = run_cli("complete", *args)
        errors = [x for x in proc.stderr.splitlines() if x.startswith("Error")]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
        assert message in errors[0]


@pytest.mark.slow
def test_export_fuses_the_adapters_into_a_model_mlx_lm_loads(tiny_run, tmp_path, cache_dir):
    import mlx.core as mx
    from mlx_lm.utils import load

    from mlx_ltc import models

    _, run = tiny_run
    proc = run_cli("export", run, "--out", tmp_path / "fused", "--dequantize")
    assert proc.returncode == 0, proc.stderr
    fused, _ = load(str(tmp_path / "fused"))
    session = Session(run, cache_dir=cache_dir, log=lambda m: None)
    tokens = mx.array(session.prompter.corpus.infos["pkg/mod1.py"].tokens[:64])[None]
    adapted = session.loaded.model(tokens)
    assert mx.abs(fused(tokens) - adapted).max().item() < 1e-2 * mx.abs(adapted).max().item()
    base = models.load(models.resolve("tiny-starcoder2", cache_dir), "always")
    assert mx.abs(base.model(tokens) - adapted).max().item() > 0  # the adapters are in the fused weights
    generate = [str(Path(sys.executable).parent / "mlx_lm.generate"), "--model", str(tmp_path / "fused")]
    proc = subprocess.run([*generate, "--prompt", "def", "--max-tokens", "4", "--ignore-chat-template"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("export", run, "--out", tmp_path / "gguf", "--gguf")
    errors = [x for x in proc.stderr.splitlines() if x.startswith("Error")]
    assert proc.returncode == 1 and errors == [
        "Error: --gguf: mlx-lm converts llama, mistral, mixtral models to GGUF, not 'starcoder2' (tiny-starcoder2); "
        "export without --gguf for the fused mlx-lm directory"
    ]
    assert not (tmp_path / "gguf").exists()
    proc = run_cli("export", run, "--out", tmp_path / "fused")
    assert proc.returncode == 1 and "exists and is not empty" in proc.stderr
