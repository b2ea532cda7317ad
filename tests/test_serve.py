"""`mlx-ltc serve`: requests read as the OpenAI and llama.cpp APIs define them, prompts built from an
editor's text as training built them, and a real server in a subprocess answering a real HTTP client."""

import dataclasses
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import run_cli

from mlx_ltc.config import ServeConfig
from mlx_ltc.errors import UserError
from mlx_ltc.eval import completion
from mlx_ltc.use.complete import Session
from mlx_ltc.use.prompts import Editor, LineIndex, healed, prompt_at
from mlx_ltc.use.serve import HTTPError, parse_completions, parse_infill

DEFAULTS = ServeConfig()


def test_requests_are_read_as_the_openai_and_llama_cpp_apis_define_them():
    r = parse_completions({"prompt": ["def f("], "path": "a.py", "stop": "\n", "temperature": None}, DEFAULTS)
    assert (r.route, r.file, r.prefix, r.suffix, r.stop, r.temp, r.max_tokens) == (
        "completions", "a.py", "def f(", "", ("\n",), 0.0, DEFAULTS.max_tokens,
    )  # fmt: skip
    r = parse_infill(
        {"input_prefix": "x = 1\n", "prompt": "y = ", "input_suffix": "\nz", "n_predict": 9, "filename": "b.py",
         "input_extra": [{"filename": "c.py", "text": "C = 3\n"}, {"text": "loose"}], "t_max_predict_ms": 500},
        DEFAULTS,
    )  # fmt: skip
    assert (r.prefix, r.suffix, r.max_tokens, r.file, r.seconds) == ("x = 1\ny = ", "\nz", 9, "b.py", 0.5)
    assert r.extra == (("c.py", "C = 3\n"), ("context", "loose"))
    bad = [
        ({}, "'prompt' must be a string"),
        ({"prompt": ["a", "b"]}, "'prompt' must be a string"),
        ({"prompt": "", "max_tokens": "12"}, "'max_tokens' must be a positive integer"),
        ({"prompt": "", "max_tokens": True}, "'max_tokens' must be a positive integer"),
        ({"prompt": "", "temperature": -1}, "'temperature' must be a number in [0, 10]"),
        ({"prompt": "", "top_p": 0}, "'top_p' must be a number in (0, 1]"),
        ({"prompt": "", "stop": [""]}, "'stop' must be a string or a list of at most 16"),
        ({"prompt": "", "stop": ["x"] * 17}, "'stop' must be a string or a list of at most 16"),
        ({"prompt": "", "stream": "yes"}, "'stream' must be true or false"),
        ({"prompt": "", "n": 2}, "one completion per request"),
        ({"prompt": "", "echo": True}, "'echo' is not supported"),
        ({"prompt": "\ud800"}, "not valid Unicode"),
    ]
    for body, message in bad:
        with pytest.raises(HTTPError, match=re.escape(message)) as e:
            parse_completions(body, DEFAULTS)
        assert e.value.status == 400
    for body, message in [
        ({"input_extra": {"filename": "x"}}, "'input_extra' must be a list"),
        ({"input_extra": ["text"]}, "each 'input_extra' chunk must be an object"),
        ({"t_max_predict_ms": 0}, "'t_max_predict_ms' must be a positive number"),
    ]:
        with pytest.raises(HTTPError, match=re.escape(message)):
            parse_infill(body, DEFAULTS)


def test_the_file_of_an_unnamed_request_is_recognised_by_its_lines():
    body = lambda name: "".join(f"    result_{name}_{i} = compute_{name}(value, {i})\n" for i in range(30))  # noqa: E731
    common = "from typing import Optional, Sequence\n"  # in every file: tells nothing
    texts = {f"pkg/{n}.py": common + f"def {n}(value):\n" + body(n) for n in ("alpha", "beta", "gamma", "delta")}
    index = LineIndex(texts)
    alpha = texts["pkg/alpha.py"]
    assert index.find(alpha[:400], alpha[400:]) == "pkg/alpha.py"
    assert index.find(alpha[200:900] + "    unsaved = edit_in_progress(value)\n", "") == "pkg/alpha.py"  # a window
    assert index.find(common * 10, "") is None  # boilerplate only
    assert index.find("def brand_new(value):\n" + body("new"), "") is None
    mixed = "".join(texts[p].splitlines(keepends=True)[5] for p in texts) * 2  # a line of each: no majority
    assert index.find(mixed, "") is None
    assert index.find(alpha.splitlines(keepends=True)[3], "") is None  # too few lines to tell


def test_whitespace_before_the_cursor_is_written_by_the_model_and_not_repeated():
    heal = "\n    "  # the cursor on a new, indented line
    grown = ["\n", "\n  ", "\n    ", "\n    return", "\n    return x", "\n        deeper"]
    assert [healed(t, heal) for t in grown] == ["", "", "", "return", "return x", "    deeper"]
    assert [healed(t, heal) for t in ["\n", "\n\n", "\n\n    def f"]] == ["", "", "def f"]  # another start
    assert healed(" 1", " ") == "1" and healed("same", "") == "same"


@pytest.fixture(scope="module")
def session(tiny_run, cache_dir):
    _, run = tiny_run
    return Session(run, cache_dir=cache_dir, log=lambda m: None)


def test_an_editors_text_gets_the_prompt_training_built(session, tiny_run):
    repo, _ = tiny_run
    p, path = session.prompter, "pkg/mod2.py"
    text = p.texts[path]
    at = text.index("\n\ndef func_2_9")  # the end of a line, as `complete --line` and the benchmark cut
    saved = session.editor.prompt(path, text[:at], text[at:], [], 600)
    expected, mode = prompt_at(p, path, at, 600)
    assert saved.tokens.tolist() == expected.tokens.tolist() and (saved.path, saved.mode) == (path, mode)
    assert saved.cross_file_tokens > 0  # pkg/mod3.py, which mod2 imports
    absolute = session.editor.prompt(str(repo / path), text[:at], text[at:], [], 600)
    assert absolute.tokens.tolist() == saved.tokens.tolist()

    typed = text[:at] + "\n\ndef func_2_9(value):\n    return"  # unsaved edits, further down
    edited = session.editor.prompt(path, typed, text[at:], [], 600)
    assert edited.cross_file_tokens < saved.cross_file_tokens  # chosen again, with room to type on
    for more in (" value", " value * 9 + 2\n\ndef func_2_10(value):\n    return value * 10"):
        further = session.editor.prompt(path, typed + more, text[at:], [], 600)
        deps = len(p.repo) + edited.cross_file_tokens
        assert further.tokens[:deps].tolist() == edited.tokens[:deps].tolist()  # the cached prefix holds
        assert session.loaded.tokenizer.decode(further.tokens[-12:].tolist()).endswith(more[-12:])

    typed = text + "def func_2_30(value):"  # a file longer than the budget: its most recent lines
    long = session.editor.prompt(path, typed, "", [], 160)
    assert 160 - 20 - 16 <= len(long.tokens) <= 160 - 20  # rebuilt at a line, an eighth left to type into
    for more in ("\n    return", "\n    return value * 30 + 2\n\ndef func_2_31(value):"):
        further = session.editor.prompt(path, typed + more, "", [], 160)
        assert completion.shared(long.tokens, further.tokens) >= len(long.tokens) - 1 and len(further.tokens) <= 160

    new = session.editor.prompt("pkg/new.py", "from pkg import mod2\n", "", [], 600)
    assert new.cross_file_tokens == 0 and "<file_sep>pkg/new.py" in session.loaded.tokenizer.decode(new.tokens)
    outside = session.editor.prompt("/elsewhere/x.py", "x = 1\n", "", [], 600)
    bare = session.editor.prompt(None, "x = 1\n", "", [], 600)
    assert bare.found is None
    assert outside.path is None and outside.tokens.tolist() == bare.tokens.tolist()
    for name, message in [("../up.py", "not a path inside"), ("a<file_sep>b.py", "control token <file_sep>"),
                          ("a\nb.py", "control character")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            session.editor.prompt(name, "x", "", [], 600)
    with pytest.raises(UserError, match="control token"):
        session.editor.prompt(None, "x", "", [("<repo_name>evil", "y")], 600)

    indented = session.editor.prompt(path, text[:at] + "\n\ndef g():\n    ", text[at:], [], 600)
    plain = session.editor.prompt(path, text[:at] + "\n\ndef g():", "\n    " + text[at:], [], 600)
    assert indented.heal == "\n    " and plain.heal == "" and indented.tokens.tolist() == plain.tokens.tolist()

    unnamed = session.editor.prompt(None, text[:at], text[at:], [], 600)
    assert (unnamed.path, unnamed.found) == (path, "text") and unnamed.cross_file_tokens > 0
    alone = session.editor.prompt(None, text[:at], text[at:], [], 600, repo_context=False)
    assert (alone.path, alone.found, alone.cross_file_tokens) == (None, None, 0)
    assert (
        alone.tokens.tolist() == session.editor.prompt(path, text[:at], "", [], 600, repo_context=False).tokens.tolist()
    )

    extra = [("notes/a.py", "A = 1\n"), ("notes/big.py", "B = 2\n" * 400)]
    chunked = session.editor.prompt(None, "x = 1\n", "", extra, 600)
    decoded = session.loaded.tokenizer.decode(chunked.tokens)
    assert "<file_sep>notes/a.py\nA = 1\n" in decoded and "notes/big.py" not in decoded  # what fits, ahead
    assert chunked.extra_tokens > 0 and len(chunked.tokens) == len(bare.tokens) + chunked.extra_tokens


def test_a_suffix_is_filled_in_the_middle_when_the_tokenizer_has_fim_tokens(session):
    path, p = "pkg/mod1.py", session.prompter
    text = p.texts[path]
    at = text.index("\n\ndef func_1_4")
    plain = session.editor.prompt(path, text[:at], "SUFFIX_TEXT", [], 600)
    assert plain.mode == "cross_file" and "SUFFIX_TEXT" not in session.loaded.tokenizer.decode(plain.tokens)
    copy = dataclasses.replace(p.markers, fim=(7, 8, 9))  # stand-ins: neither model here has FIM tokens
    fim_prompter = type(p).__new__(type(p))
    fim_prompter.__dict__.update(p.__dict__, markers=copy)
    editor = Editor(fim_prompter, session.repo)
    for file, repo_context in [(path, True), (None, False)]:  # the file's own prompt; the text alone
        fim = editor.prompt(file, text[:at], "SUFFIX_TEXT\n", [], 600, repo_context)
        t = fim.tokens.tolist()
        pre, suf, mid = t.index(7), t.index(8), t.index(9)
        assert fim.mode == "fim" and pre < suf < mid == len(t) - 1 and fim.path == file
        assert session.loaded.tokenizer.decode(t[suf + 1 : mid]) == "SUFFIX_TEXT\n"
        assert session.loaded.tokenizer.decode(t[pre + 1 : suf]).endswith("return value * 3 + 1")


def test_generation_reuses_the_cache_of_a_prompt_that_starts_alike_and_stops_at_stop_strings(session):
    text = session.prompter.texts["pkg/mod0.py"]
    tokens = session.editor.prompt("pkg/mod0.py", text[:200], "", [], 120).tokens

    def run(tokens, **kwargs):
        steps, pieces = session.generate(tokens, 8, **kwargs), []
        while True:
            try:
                pieces.append(next(steps))
            except StopIteration as end:
                return pieces, end.value

    pieces, first = run(tokens)
    again_pieces, again = run(tokens)
    assert "".join(pieces) == first.text == again.text and again_pieces == pieces
    assert (first.tokens, again.prompt_tokens, again.reused_tokens) == (8, len(tokens), len(tokens) - 1)
    longer = np.concatenate([tokens, tokens[-3:]])
    _, extended = run(longer)
    assert extended.reused_tokens == len(tokens)  # everything the two prompts share
    word = first.text.split()[-1]  # greedy: the same text again, so it stops before its last word
    _, stopped = run(tokens, stop=(word,))
    assert stopped.finish == "stop" and word not in stopped.text and first.text.startswith(stopped.text)


class Server:
    """`mlx-ltc serve` in a subprocess on a free port, its log read as it comes."""

    def __init__(self, *args):
        command = [sys.executable, "-m", "mlx_ltc", "serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.log, listening = [], threading.Event()

        def read():
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                listening.set() if "listening on" in line else None
            listening.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        assert listening.wait(120), self.log
        found = [re.search(r"http://([\d.]+):(\d+)", x) for x in self.log]
        assert any(found), self.log
        self.host, self.port = next(m.groups() for m in found if m)
        deadline = time.monotonic() + 180
        while self.get("/health")[0] != 200:
            assert time.monotonic() < deadline and self.proc.poll() is None, self.log
            time.sleep(0.2)

    def connection(self):
        return http.client.HTTPConnection(self.host, int(self.port), timeout=120)

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}{path}", timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())
        except OSError:
            return None, None

    def post(self, path, body, raw: bytes | None = None):
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.host}:{self.port}{path}", data=data, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, r.headers.get("Content-Type"), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Content-Type"), e.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.reader.join(timeout=10)  # the log's last lines, read after the process ended
        return code


def events(raw: bytes) -> list:
    """The data of each server-sent event."""
    return [x[len("data: ") :] for x in raw.decode().split("\n\n") if x.startswith("data: ")]


@pytest.fixture(scope="module")
def server(tiny_run, cache_dir, tmp_path_factory):
    _, run = tiny_run
    cfg = tmp_path_factory.mktemp("serve") / "serve.yaml"
    cfg.write_text("serve:\n  max_body: 4096\n")
    server = Server(run, "--config", cfg)
    yield server
    assert server.stop() == 0 and server.log[-1] == "serve: stopped", server.log


def test_served_completions_infill_and_streams(server, tiny_run):
    repo, _ = tiny_run
    status, models = server.get("/v1/models")
    assert status == 200 and models["data"][0]["id"] == "run"
    text = (repo / "pkg" / "mod3.py").read_text()
    at = text.index("def func_3_1(")
    body = {"prompt": text[:at], "suffix": text[at:], "path": "pkg/mod3.py", "max_tokens": 10}
    status, kind, raw = server.post("/v1/completions", body)
    first = json.loads(raw)
    assert (status, kind) == (200, "application/json") and first["object"] == "text_completion"
    choice, usage, context = first["choices"][0], first["usage"], first["context"]
    assert choice["finish_reason"] in ("stop", "length") and usage["completion_tokens"] <= 10
    assert (context["file"], context["found"]) == ("pkg/mod3.py", "named") and context["cross_file_tokens"] > 0
    again = json.loads(server.post("/v1/completions", body)[2])
    assert again["choices"][0]["text"] == choice["text"]  # greedy
    assert again["context"]["cached_tokens"] == usage["prompt_tokens"] - 1  # the same prompt: all but the last

    status, kind, raw = server.post("/v1/completions", {**body, "stream": True})
    chunks = events(raw)
    assert (status, kind, chunks[-1]) == (200, "text/event-stream", "[DONE]")
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert "".join(c["choices"][0]["text"] for c in parsed) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in parsed][-1] == choice["finish_reason"]
    assert parsed[-1]["usage"] == usage

    infill = {"input_prefix": text[:at], "input_suffix": text[at:], "n_predict": 10,
              "input_extra": [{"filename": "notes/todo.py", "text": "TODO = 1\n"}]}  # fmt: skip
    status, _, raw = server.post("/infill", {**infill, "repo_context": False})
    answer = json.loads(raw)
    assert status == 200 and answer["stop"] is True and answer["context"]["extra_tokens"] > 0
    found = json.loads(server.post("/infill", infill)[2])  # no file name: recognised, the graph's documents first
    assert (found["context"]["file"], found["context"]["found"]) == ("pkg/mod3.py", "text")
    assert found["context"]["cross_file_tokens"] > 0 and found["tokens_evaluated"] <= 128 - 10
    infill["repo_context"] = False
    assert answer["tokens_evaluated"] <= 128 - 10 and answer["timings"]["predicted_n"] == answer["tokens_predicted"]
    status, _, raw = server.post("/infill", {**infill, "stream": True})
    pieces = [json.loads(c) for c in events(raw)]
    assert status == 200 and pieces[-1]["stop"] is True and all(not p["stop"] for p in pieces[:-1])
    assert "".join(p["content"] for p in pieces) == answer["content"]


def test_greedy_complete_equals_greedy_served_completion(server, tiny_run):
    repo, run = tiny_run
    proc = run_cli("complete", run, "--file", "pkg/mod4.py", "--line", "9", "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    text = (repo / "pkg" / "mod4.py").read_text()
    body = {"prompt": text[: done["at"]], "suffix": text[done["at"] :], "path": "pkg/mod4.py", "max_tokens": 12}
    served = json.loads(server.post("/v1/completions", body)[2])
    assert served["choices"][0]["text"] == done["text"]
    assert served["usage"]["prompt_tokens"] == done["prompt_tokens"]
    assert served["context"]["cross_file_tokens"] == done["cross_file_tokens"]


def test_concurrent_requests_are_each_answered_alone(server):
    bodies = [{"prompt": f"def func_{i}_{i}(value):\n", "path": f"pkg/mod{i}.py", "max_tokens": 6} for i in range(6)]
    alone = [json.loads(server.post("/v1/completions", b)[2])["choices"][0]["text"] for b in bodies]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: server.post("/v1/completions", b), bodies * 2))
    for i, (status, _, raw) in enumerate(together):
        assert status == 200, raw
        text = json.loads(raw)["choices"][0]["text"]
        assert text == alone[i % 6]


def test_bad_requests_get_json_errors_and_the_server_goes_on(server):
    cases = [
        ("/v1/completions", None, b'{"prompt": ', 400, "not JSON"),
        ("/v1/completions", None, b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 100}, None, 400, "leaves 28 of the 128-token context"),
        ("/v1/completions", {"prompt": "x", "path": "../etc/passwd"}, None, 400, "not a path inside"),
        ("/v1/completions", {"prompt": "x" * 5000}, None, 413, "at most 4096"),
        ("/v1/chat/completions", {"messages": []}, None, 404, "no route POST /v1/chat/completions"),
    ]
    for path, body, raw, status, message in cases:
        got, kind, answer = server.post(path, body, raw)
        error = json.loads(answer)["error"]
        assert (got, kind, error["code"]) == (status, "application/json", status) and message in error["message"]
    assert server.get("/nowhere")[0] == 404
    c = server.connection()  # a body without its length
    c.putrequest("POST", "/v1/completions")
    c.endheaders()
    assert c.getresponse().status == 411
    c.close()
    assert server.get("/health") == (200, {"status": "ok"})


def test_sigterm_stops_the_server_and_bad_input_is_one_line(tiny_run, tmp_path):
    import socket

    _, run = tiny_run
    server = Server(run)
    assert server.post("/v1/completions", {"prompt": "def", "max_tokens": 2})[0] == 200
    assert server.stop() == 0 and server.log[-1] == "serve: stopped"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in [
            ((tmp_path / "nowhere",), "run directory does not exist"),
            ((run, "--port", port), f"can't listen on 127.0.0.1:{port}: Address already in use"),
            ((run, "--port", "70000"), "70000 is not in the range"),
        ]:
            proc = run_cli("serve", *args)
            errors = [x for x in proc.stderr.splitlines() if x.startswith("Error")]
            assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
            assert message in errors[0]


def test_requests_while_the_model_loads_get_503(tiny_run, cache_dir):
    from mlx_ltc.use.serve import Engine
    from mlx_ltc.use.serve import Server as HTTPServer

    _, run = tiny_run
    gate, stop, cfg, log = threading.Event(), threading.Event(), ServeConfig(port=0), lambda m: None
    engine = Engine(lambda: gate.wait(60) and Session(run, cache_dir=cache_dir, log=log), cfg, log)
    httpd = HTTPServer(("127.0.0.1", 0), engine, cfg, "run", log)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    model = threading.Thread(target=engine.run, args=(stop,))
    model.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for request in (url + "/health", urllib.request.Request(url + "/infill", data=b"{}", method="POST")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=30)
            assert e.value.code == 503 and "loading" in json.loads(e.value.read())["error"]["message"]
        gate.set()
        assert engine.ready.wait(120)
        with urllib.request.urlopen(urllib.request.Request(url + "/infill", data=b"{}", method="POST")) as r:
            assert r.status == 200 and "content" in json.loads(r.read())
    finally:
        gate.set()
        stop.set()
        model.join(60)
        httpd.shutdown()
        httpd.server_close()
    assert engine.session is None  # let go in the thread that used it


def test_the_repository_is_read_again_when_it_changes(tiny_run, cache_dir, tmp_path, monkeypatch):
    import shutil

    from mlx_ltc.use import complete

    repo, run = tiny_run
    copy = shutil.copytree(repo, tmp_path / "repo")
    session = Session(run, repo=copy, cache_dir=cache_dir, log=lambda m: None)
    decode = lambda p: session.loaded.tokenizer.decode(p.tokens.tolist())  # noqa: E731
    before = session.editor.prompt("pkg/mod0.py", "from pkg import mod1\n", "", [], 600)
    assert "<file_sep>pkg/mod1.py" in decode(before) and not session.refresh()  # nothing changed, none read
    (copy / "pkg" / "extra.py").write_text(
        "".join(f"def extra_{i}(value):\n    return value - {i}\n\n" for i in range(9))
    )
    (copy / "pkg" / "mod0.py").write_text("from pkg import extra\n" + (copy / "pkg" / "mod0.py").read_text())
    monkeypatch.setattr(complete, "RESCAN_S", 0.0)
    assert session.refresh()
    after = session.editor.prompt("pkg/mod0.py", "from pkg import extra\n", "", [], 600)
    assert "<file_sep>pkg/extra.py" in decode(after)
    assert not session.refresh()
