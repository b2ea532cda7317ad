"""`mlx-ltc serve RUN`: a run's model behind HTTP for editors.

- `POST /v1/completions` (OpenAI: `prompt`, `suffix`, `max_tokens`, `temperature`, `top_p`, `stop`,
  `stream` as server-sent events) and `GET /v1/models`;
- `POST /infill` (llama.cpp, as llama.vim and llama.vscode send it: `input_prefix`, `prompt`,
  `input_suffix`, `input_extra` chunks of other files, `n_predict`, `t_max_predict_ms`, `stream`);
- `GET /health`: 200 when ready, 503 while the model loads.

A request that names its file (`path` or `filename`, relative to the repository or absolute inside it),
or whose text is recognisably one of the repository's files, gets the prompt training used: the file's
dependencies from the import graph within the context, then the editor's text of the file
(`"repo_context": false` asks for the text alone). One thread owns the model (MLX's generation stream
is per thread) and serves the queue in order, keeping the KV cache of the last prompt for the next one
that starts alike. The standard library's ThreadingHTTPServer reads requests, as mlx-lm's server does."""

import gc
import json
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mlx_ltc.config import ServeConfig
from mlx_ltc.errors import UserError
from mlx_ltc.eval.run import check_run

MAX_STOP = 16  # stop strings per request
MAX_EXTRA = 64  # context chunks per /infill request


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """What one completion request asks for, whichever route it came by."""

    route: str  # completions | infill
    file: str | None
    prefix: str
    suffix: str
    extra: tuple  # (file name, text) chunks of other files
    max_tokens: int
    temp: float
    top_p: float
    top_k: int
    stop: tuple
    stream: bool
    seconds: float | None  # generation time limit after the first token
    repo_context: bool  # false: the text alone, no file of the repository looked for
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])  # its answer's, every streamed event too


def _get(body: dict, key: str, kind, default=None, check=None, why: str = ""):
    value = body.get(key)
    if value is None:  # absent or null: the default
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not ok or (check is not None and not check(value)):
        raise HTTPError(400, f"'{key}' must be {why}, got {json.dumps(value)[:80]}")
    if isinstance(value, str):
        _utf8(key, value)
    return value


def _utf8(key: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, f"'{key}' is not valid Unicode text (a lone surrogate)") from None
    return text


def _stop(body: dict) -> tuple:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return ()
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise HTTPError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings")
    return tuple(_utf8("stop", s) for s in stop)


def _sampling(body: dict, max_key: str, defaults: ServeConfig) -> dict:
    return {
        "max_tokens": _get(body, max_key, int, defaults.max_tokens, lambda v: v >= 1, "a positive integer"),
        "temp": float(_get(body, "temperature", (int, float), 0.0, lambda v: 0 <= v <= 10, "a number in [0, 10]")),
        "top_p": float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        "top_k": _get(body, "top_k", int, 0, lambda v: v >= 0, "an integer of 0 or more"),
        "stop": _stop(body),
        "stream": _get(body, "stream", bool, False, why="true or false"),
        "repo_context": _get(body, "repo_context", bool, True, why="true or false"),
    }


def _file(body: dict) -> str | None:
    return _get(body, "path", str, None, why="a file name") or _get(body, "filename", str, None, why="a file name")


def parse_completions(body: dict, defaults: ServeConfig) -> Request:
    """An OpenAI completions request (`path`/`filename`: this server's addition)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise HTTPError(400, "'prompt' must be a string (or a list of one string)")
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise HTTPError(400, "one completion per request: 'n' and 'best_of' must be 1")
    if body.get("echo"):
        raise HTTPError(400, "'echo' is not supported")
    suffix = _get(body, "suffix", str, "", why="a string")
    return Request("completions", _file(body), _utf8("prompt", prompt), suffix, (), seconds=None,
                   **_sampling(body, "max_tokens", defaults))  # fmt: skip


def parse_infill(body: dict, defaults: ServeConfig) -> Request:
    """A llama.cpp infill request: the prefix is `input_prefix` then `prompt` (the cursor's line so far)."""
    prefix = _get(body, "input_prefix", str, "", why="a string") + _get(body, "prompt", str, "", why="a string")
    extra = _get(body, "input_extra", list, [], lambda v: len(v) <= MAX_EXTRA, f"a list of at most {MAX_EXTRA} chunks")
    chunks = []
    for chunk in extra:
        if not isinstance(chunk, dict):
            raise HTTPError(400, "each 'input_extra' chunk must be an object with 'filename' and 'text'")
        name = _get(chunk, "filename", str, "", why="a file name")
        chunks.append((name or "context", _get(chunk, "text", str, "", why="a string")))
    limit = _get(body, "t_max_predict_ms", (int, float), None, lambda v: v > 0, "a positive number")
    return Request("infill", _file(body), prefix, _get(body, "input_suffix", str, "", why="a string"),
                   tuple(chunks), seconds=limit / 1000 if limit else None,
                   **_sampling(body, "n_predict", defaults))  # fmt: skip


class Job:
    """One request on its way through the model thread: its answer comes back piece by piece on `out`
    as ("text", str), then ("done", (Generated, EditorPrompt)) or ("error", HTTPError)."""

    def __init__(self, request: Request):
        self.request, self.out, self.cancelled = request, queue.Queue(), threading.Event()

    def run(self, session, context: int, stopping: threading.Event) -> None:
        r = self.request
        try:
            if r.repo_context:
                session.refresh()
            budget = session.budget(context, r.max_tokens, "max_tokens")
            prompt = session.editor.prompt(r.file, r.prefix, r.suffix, list(r.extra), budget, r.repo_context)
            steps = session.generate(
                prompt.tokens, r.max_tokens, r.temp, r.top_p, r.top_k, r.stop, r.seconds, prompt.heal
            )
            while True:
                if self.cancelled.is_set() or stopping.is_set():
                    steps.close()
                    self.out.put(("error", HTTPError(503, "the request was cancelled")))
                    return
                try:
                    self.out.put(("text", next(steps)))
                except StopIteration as end:
                    self.out.put(("done", (end.value, prompt)))
                    return
        except UserError as e:
            self.out.put(("error", HTTPError(400, str(e))))
        except Exception as e:  # the model thread keeps serving; the client hears what broke
            self.out.put(("error", HTTPError(500, f"{type(e).__name__}: {e}")))


class Engine:
    """Loads the model and generates, a request at a time in arrival order, in the thread that calls
    `run`: `serve`'s main thread, as MLX's streams belong to the thread that uses them (a model used
    from another thread made the process abort at exit: "terminate called without an active exception")."""

    def __init__(self, load, cfg: ServeConfig, log):
        self.load, self.cfg, self.log = load, cfg, log
        self.jobs = queue.Queue(maxsize=cfg.queue)
        self.ready, self.stopping = threading.Event(), threading.Event()
        self.session, self.context = None, None

    def run(self, stop: threading.Event, on_ready=None) -> None:
        """Load, then serve the queue until `stop` is set; the requests still waiting then get 503."""
        self.session = self.load()
        self.context = self.cfg.context or self.session.cfg.data.seq_len
        window = getattr(getattr(self.session.loaded.model, "args", None), "max_position_embeddings", None)
        if window and self.context > window:
            raise UserError(f"--context {self.context} is more than the model's {window} positions")
        self.ready.set()
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            try:
                job = self.jobs.get(timeout=0.2)
            except queue.Empty:
                continue
            job.run(self.session, self.context, stop)
        self.stopping.set()
        while True:
            try:
                self.jobs.get_nowait().out.put(("error", HTTPError(503, "the server is shutting down")))
            except queue.Empty:
                break
        self.session = None
        gc.collect()

    def submit(self, request: Request) -> Job:
        if self.stopping.is_set():
            raise HTTPError(503, "the server is shutting down")
        if not self.ready.is_set():
            raise HTTPError(503, "the model is loading; try again shortly")
        job = Job(request)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise HTTPError(503, f"{self.cfg.queue} requests are already waiting; try again shortly") from None
        return job


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-ltc"
    timeout = 60  # seconds a client may take to send its request

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, route) -> None:
        started = time.perf_counter()
        try:
            status, note = route()
        except HTTPError as e:
            status, note = e.status, str(e)
            self._json(e.status, {"error": {"message": str(e), "type": _ERROR_TYPES.get(e.status, "error"),
                                            "code": e.status}})  # fmt: skip
        except (BrokenPipeError, ConnectionResetError):
            status, note = 499, "the client went away"
            self.close_connection = True
        except Exception as e:  # a bug: the client gets a 500 and the server goes on
            status, note = 500, f"{type(e).__name__}: {e}"
            self.close_connection = True
            self._json(500, {"error": {"message": note, "type": "server_error", "code": 500}})
        self.server.log(f"{self.command} {self.path} {status} {time.perf_counter() - started:.2f}s {note}".rstrip())

    def _get(self):
        engine, route = self.server.engine, urlsplit(self.path).path
        if route == "/health":
            if not engine.ready.is_set():
                raise HTTPError(503, "the model is loading")
            self._json(200, {"status": "ok"})
        elif route == "/v1/models":
            model = {"id": self.server.model_id, "object": "model", "created": self.server.created,
                     "owned_by": "mlx-ltc"}  # fmt: skip
            self._json(200, {"object": "list", "data": [model]})
        else:
            raise HTTPError(404, f"no route GET {self.path}: GET /v1/models, /health; POST /v1/completions, /infill")
        return 200, ""

    def _post(self):
        parse = {"/v1/completions": parse_completions, "/infill": parse_infill}.get(urlsplit(self.path).path)
        if parse is None:
            self._drain_body()
            raise HTTPError(404, f"no route POST {self.path}: POST /v1/completions, /infill; GET /v1/models, /health")
        request = parse(self._body(), self.server.cfg)
        job = self.server.engine.submit(request)
        try:
            return (self._stream if request.stream else self._whole)(job)
        finally:
            job.cancelled.set()  # a client gone mid-stream frees the model at its next token

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise HTTPError(411, "a request body needs a Content-Length header")
        if int(length) > self.server.cfg.max_body:
            self.close_connection = True  # the body is left unread
            raise HTTPError(413, f"the request body is {int(length)} bytes; at most {self.server.cfg.max_body}")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return body

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) <= self.server.cfg.max_body:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _whole(self, job: Job):
        text = []
        while True:
            kind, value = job.out.get()
            if kind == "text":
                text.append(value)
            elif kind == "error":
                raise value
            else:
                done, prompt = value
                break
        self._json(200, self.server.reply(job.request, "".join(text), done, prompt))
        return 200, _note(done, prompt)

    def _stream(self, job: Job):
        kind, value = job.out.get()  # errors before the first token still get a status of their own
        if kind == "error":
            raise value
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            if kind == "text":
                self._event(self.server.piece(job.request, value))
            elif kind == "error":
                self._event({"error": {"message": str(value), "code": value.status}})
                break
            else:
                done, prompt = value
                self._event(self.server.reply(job.request, "", done, prompt, last_chunk=True))
                if job.request.route == "completions":
                    self._chunk(b"data: [DONE]\n\n")
                break
            kind, value = job.out.get()
        self._chunk(b"")
        return 200, _note(done, prompt) if kind == "done" else f"ended: {value}"

    def _event(self, payload: dict) -> None:
        self._chunk(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (the standard library's name) — one line per request instead
        pass


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 411: "invalid_request_error",
                413: "invalid_request_error", 500: "server_error", 503: "unavailable_error"}  # fmt: skip


def _note(done, prompt) -> str:
    where = prompt.path or "-"
    return (f"{where} {prompt.mode}: prompt {done.prompt_tokens} ({done.reused_tokens} cached, "
            f"{prompt.cross_file_tokens} cross-file) +{done.tokens} tokens")  # fmt: skip


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: Engine, cfg: ServeConfig, model_id: str, log):
        super().__init__(address, Handler)
        self.engine, self.cfg, self.model_id, self.log = engine, cfg, model_id, log
        self.created = int(time.time())

    def context_of(self, done, prompt) -> dict:
        return {"file": prompt.path, "found": prompt.found, "mode": prompt.mode,
                "cross_file_tokens": prompt.cross_file_tokens, "extra_tokens": prompt.extra_tokens,
                "cached_tokens": done.reused_tokens}  # fmt: skip

    def piece(self, request: Request, text: str) -> dict:
        if request.route == "infill":
            return {"content": text, "stop": False}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return {"id": self._id(request), "object": "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice]}  # fmt: skip

    def reply(self, request: Request, text: str, done, prompt, last_chunk: bool = False) -> dict:
        """The whole answer (or, streamed, the last event, whose text came before)."""
        if request.route == "infill":
            prompt_n = done.prompt_tokens - done.reused_tokens
            timings = {
                "cache_n": done.reused_tokens, "prompt_n": prompt_n, "prompt_ms": done.prompt_s * 1e3,
                "prompt_per_second": prompt_n / max(done.prompt_s, 1e-9),
                "predicted_n": done.tokens, "predicted_ms": done.generate_s * 1e3,
                "predicted_per_second": max(done.tokens - 1, 0) / max(done.generate_s, 1e-9),
            }  # fmt: skip
            return {"content": text, "stop": True, "model": self.model_id, "tokens_predicted": done.tokens,
                    "tokens_evaluated": done.prompt_tokens, "tokens_cached": done.reused_tokens,
                    "stop_type": "eos" if done.finish == "stop" else "limit", "truncated": False,
                    "timings": timings, "context": self.context_of(done, prompt)}  # fmt: skip
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish}
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.tokens,
                 "total_tokens": done.prompt_tokens + done.tokens}  # fmt: skip
        return {"id": self._id(request), "object": "text_completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice], "usage": usage,
                "context": self.context_of(done, prompt)}  # fmt: skip

    @staticmethod
    def _id(request: Request) -> str:
        return "cmpl-" + request.id


def _describe(session) -> str:
    return (f"{session.model_name} {session.cfg.model.name}, repository {session.repo} "
            f"({len(session.prompter.corpus.infos)} files)")  # fmt: skip


def serve(run_dir: Path, repo: Path | None, base: bool, cfg: ServeConfig, log) -> None:
    """Serve until SIGINT or SIGTERM; raises UserError when the run can't be served."""
    from mlx_ltc.use.complete import Session

    run_dir = Path(run_dir)
    check_run(run_dir)
    engine = Engine(lambda: Session(run_dir, repo, base, log=log), cfg, log)
    try:
        server = Server((cfg.host, cfg.port), engine, cfg, run_dir.name + ("-base" if base else ""), log)
    except OSError as e:
        raise UserError(f"can't listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    stop = threading.Event()

    def on_signal(*_):
        if not engine.ready.is_set():
            raise KeyboardInterrupt  # while loading: stop loading now
        stop.set()  # while serving: the generation in progress ends at its next token

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    threading.Thread(target=server.serve_forever, name="mlx-ltc-http", daemon=True).start()
    log(f"serve: listening on http://{host}:{port} (503 until the model has loaded)")
    ready = lambda: log(f"serve: ready: {server.model_id} ({_describe(engine.session)}), "  # noqa: E731
                        f"context {engine.context} tokens; Ctrl-C or SIGTERM stops it")  # fmt: skip
    try:
        engine.run(stop, on_ready=ready)
    finally:
        server.shutdown()
        server.server_close()
        log("serve: stopped")
