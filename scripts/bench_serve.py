"""The completion server as an editor meets it: latency with and without the prompt cache, and what the
repository's import graph adds to completions, through a real `mlx-ltc serve` and HTTP.

    python scripts/bench_serve.py RUN [--context-tokens 2048] [--max-tokens 32] [--targets 64]
                                      [--targets-context N] [--conditions named,recognised,none]
                                      [--skip-latency] [--json OUT]

1. Latency: the largest file of the run's repository that imports others, cut at a line about two
   thirds in; a prompt of --context-tokens tokens (`serve --context` is set to hold it and the
   completion). Four streamed requests, timed at the client: the first (nothing cached), the same
   again, after typing one line, after typing another (a prompt extends the last one while it fits,
   else it is rebuilt with room to type into). Time to first token, tokens/s after it, and each TTFT
   over the first's.
2. Repo context: the run's held-out completion targets (eval/targets.py: cross-file lines and random
   lines of the test and val splits), each as the editor has it: the file without that line, the cursor
   at the end of the line before. Every target is requested three ways (CONDITIONS), each on a fresh
   server: the file named, the file not named (the server recognises it by its lines), and no
   repository context; at the trained length (or --targets-context), greedy; the first line written is
   scored as the completion benchmark scores it. Exact match and edit similarity per condition, and the
   paired difference from no context with a 95% interval from a bootstrap over files.
"""

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


class Served:
    """`mlx-ltc serve RUN ARGS` in a subprocess on a free port, until stopped."""

    def __init__(self, run: Path, *args):
        command = [sys.executable, "-m", "mlx_ltc", "serve", str(run), "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.port, ready = None, threading.Event()

        def read():
            for line in self.proc.stderr:
                found = re.search(r"listening on http://[\d.]+:(\d+)", line)
                self.port = int(found.group(1)) if found else self.port
                if "serve: ready" in line or line.startswith("Error"):
                    print(line.rstrip(), flush=True)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(600) or self.proc.poll() is not None:
            raise SystemExit("the server did not start")

    def request(self, path: str, body: dict) -> tuple:
        """(the answer's last event or whole JSON, seconds to the first event, seconds in all)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        started = time.perf_counter()
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise SystemExit(f"{path}: {r.status} {r.read().decode()}")
        if not body.get("stream"):
            answer = json.loads(r.read())
            return answer, None, time.perf_counter() - started
        first, last = None, None
        for line in r:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                first = first or time.perf_counter() - started
                last = json.loads(line[len(b"data: ") :])
        c.close()
        return last, first, time.perf_counter() - started

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def latency(run, corpus, args) -> list:
    deps = {s for s, _ in corpus.graph.edges}
    path = max((p for p in corpus.infos if p in deps), key=lambda p: len(corpus.infos[p].tokens))
    text = corpus.texts[path]
    lines = text.split("\n")
    cut = len("\n".join(lines[: 2 * len(lines) // 3]))
    prefix, suffix = text[:cut], text[cut:]
    served = Served(run, "--context", args.context_tokens + args.max_tokens)
    body = {"prompt": prefix, "suffix": suffix, "path": path, "max_tokens": args.max_tokens, "stream": True}
    steps = [
        ("first request", prefix),
        ("the same again", prefix),
        ("one line typed", prefix + "\n        value = self.settings.get(key)"),
        ("another typed", prefix + "\n        value = self.settings.get(key)\n        if value is None:"),
    ]
    rows = []
    try:
        for name, typed in steps:
            last, first, total = served.request("/v1/completions", {**body, "prompt": typed})
            usage, context = last["usage"], last["context"]
            rate = max(usage["completion_tokens"] - 1, 0) / max(total - first, 1e-9)
            rows.append({"request": name, "prompt_tokens": usage["prompt_tokens"], "cached": context["cached_tokens"],
                         "cross_file_tokens": context["cross_file_tokens"], "ttft_s": first,
                         "tokens": usage["completion_tokens"], "tokens_per_s": rate})  # fmt: skip
    finally:
        served.stop()
    print(f"\nlatency: {path} cut at byte {cut:,} ({len(corpus.infos[path].tokens):,} tokens in the file), "
          f"context {args.context_tokens} + {args.max_tokens}")  # fmt: skip
    print(f"{'request':<16} {'prompt':>7} {'cached':>7} {'TTFT s':>8} {'x first':>8} {'tokens':>7} {'tok/s':>7}")
    for row in rows:
        print(f"{row['request']:<16} {row['prompt_tokens']:>7} {row['cached']:>7} {row['ttft_s']:>8.2f} "
              f"{row['ttft_s'] / rows[0]['ttft_s']:>8.3f} {row['tokens']:>7} {row['tokens_per_s']:>7.1f}")  # fmt: skip
    return rows


CONDITIONS = {  # what the request says about the file
    "named": {"path": True},  # its path: the server puts its dependencies in front
    "recognised": {},  # nothing, as llama.vim and llama.vscode send it: the server finds the file by its lines
    "none": {"repo_context": False},  # no repository context: the repo header and the text
}


def repo_context(run, corpus, meta, args) -> dict:
    from mlx_ltc import progress
    from mlx_ltc.eval import completion
    from mlx_ltc.eval import targets as tg

    usable, _ = tg.split_files(meta, corpus)
    chosen = tg.select(corpus, usable, args.targets, seed=0).targets
    conditions = {name: CONDITIONS[name] for name in args.conditions.split(",")}
    scores = {name: [] for name in conditions}
    for name, extra in conditions.items():  # a server of its own each: no prompt layouts from another condition
        served = Served(run, *(("--context", args.targets_context) if args.targets_context else ()))
        try:
            for t in progress.bar(chosen, desc=f"{name}", unit="line"):
                raw = corpus.texts[t.path].encode("utf-8")
                body = {"prompt": raw[: t.cut].decode(), "suffix": raw[t.end :].decode(), "max_tokens": 48}
                body |= {"path": t.path} if extra.get("path") else {k: v for k, v in extra.items()}
                answer, _, seconds = served.request("/v1/completions", body)
                line = completion.first_line(answer["choices"][0]["text"])[0]
                context = answer["context"]
                made = {"file": context["file"], "cross_file_tokens": context["cross_file_tokens"],
                        "prompt_tokens": answer["usage"]["prompt_tokens"], "seconds": seconds}  # fmt: skip
                scores[name].append({**completion.score(t.text, line), "kind": t.kind, "path": t.path, **made})
        finally:
            served.stop()
    rng, out = np.random.default_rng(0), {}
    print(f"\nrepo context: {len(chosen)} held-out targets of {len({t.path for t in chosen})} files, greedy, "
          f"the first line written, context {args.targets_context or 'as trained'}")  # fmt: skip
    if "recognised" in scores:
        found = sum(x["file"] == x["path"] for x in scores["recognised"])
        wrong = sum(x["file"] not in (None, x["path"]) for x in scores["recognised"])
        print(f"files recognised from their text: {found} right, {wrong} wrong, {len(chosen) - found - wrong} not")
    print(f"{'kind':<16} {'n':>4} " + " ".join(f"{'EM ' + c:>13}" for c in conditions)
          + " " + " ".join(f"{'ES ' + c:>13}" for c in conditions) + "  EM named - none [95% CI]")  # fmt: skip
    for kind in (tg.CROSS, tg.RANDOM, "all"):
        pick = [i for i, t in enumerate(chosen) if kind in ("all", t.kind)]
        if not pick:
            continue
        get = lambda name, key, pick=pick: np.array([scores[name][i][key] for i in pick])  # noqa: E731
        files = np.array([chosen[i].path for i in pick])
        row = {"n": len(pick), **{f"em_{c}": get(c, "em").mean() for c in conditions},
               **{f"es_{c}": get(c, "es").mean() for c in conditions}}  # fmt: skip
        for c in [c for c in ("named", "recognised") if c in conditions]:
            row[f"em_{c}_minus_none"], row[f"em_{c}_minus_none_ci"] = completion.bootstrap(
                get(c, "em") - get("none", "em"), files, 1000, rng
            )
        row["cross_file_tokens_named"] = get("named", "cross_file_tokens").mean()
        out[kind] = row
        ci = row["em_named_minus_none_ci"]
        print(f"{kind:<16} {row['n']:>4} " + " ".join(f"{row['em_' + c]:>13.3f}" for c in conditions) + " "
              + " ".join(f"{row['es_' + c]:>13.3f}" for c in conditions)
              + f"  {row['em_named_minus_none']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")  # fmt: skip
    means = {c: np.mean([x["prompt_tokens"] for x in scores[c]]) for c in conditions}
    print("mean prompt tokens: " + ", ".join(f"{c} {m:.0f}" for c, m in means.items())
          + f"; of the named ones' cross-file: {out['all']['cross_file_tokens_named']:.0f}")  # fmt: skip
    return {"summary": out, "targets": scores}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--context-tokens", type=int, default=2048, help="prompt tokens of the latency request")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per latency request")
    parser.add_argument("--targets", type=int, default=64, help="held-out lines, half cross-file (0: skip)")
    parser.add_argument("--targets-context", type=int, default=None, help="serve --context for the targets")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help=f"of {', '.join(CONDITIONS)}")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from mlx_ltc.hardware import ensure_fast_blas

    ensure_fast_blas(script=__file__)

    from mlx_ltc import config, data, hardware, models, plan

    info = plan.RunInfo.read(args.run)
    cfg = config.build(None, info.config)
    cache = models.default_cache_dir()
    tokenizer = models.load_tokenizer(info.base_model_dir(cfg, cache))
    corpus = data.Corpus.cached(data.scan(info.repo, cfg.data.max_file_bytes), tokenizer, cfg.data, cache,
                                log=lambda m: None, progress=False)  # fmt: skip
    machine = hardware.describe()
    print(f"{args.run} ({cfg.model.name}, trained at {cfg.data.seq_len}) on {machine['platform']} "
          f"({machine['device']}, {machine['cpu_cores']} cores)")  # fmt: skip
    result = {"run": str(args.run), "model": cfg.model.name, "machine": machine}
    if not args.skip_latency:
        result["latency"] = latency(args.run, corpus, args)
    if args.targets:
        result["repo_context"] = repo_context(args.run, corpus, data.load_metadata(args.run / "data"), args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
