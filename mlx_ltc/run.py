"""`mlx-ltc train`: repo -> dataset -> LoRA training -> base eval (adapters off) -> adapted eval -> report.

The run directory is written as it goes; `COMPLETE` is written last, so a directory without it is
never mistaken for a finished run.

Under `mlx.launch` (`distributed.world()`), the main rank does all of this; every other rank checks that
it runs the same mlx-ltc with the same settings, takes the main rank's resolved config, builds the same
dataset from its own copy of the repository into a private directory (checked against the main rank's,
hash for hash), trains beside it, and exits; the evaluation after training is the main rank's.
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from mlx_ltc import __version__, atomic, backend, data, distributed, hardware, models, plan
from mlx_ltc import config as config_module
from mlx_ltc.config import Config
from mlx_ltc.errors import UserError
from mlx_ltc.eval import Perplexity
from mlx_ltc.eval.results import DataSummary, TrainReport, ValNumbers
from mlx_ltc.runtime.rundir import COMPLETE, RunDir

BASE_EVAL = "base_eval.json"


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_dir(out: Path) -> RunDir:
    return RunDir(Path(out), "an mlx-ltc run", "config.json")


def cached_profile(model_name: str, memory, cache_dir: Path):
    """The cached `mlx-ltc profile` of this model with this memory policy on this backend, or None."""
    from mlx_ltc.hardware import profile

    return profile.cached(cache_dir, model_name, asdict(memory))


def prepare_data(cfg: Config, scan, tokenizer, out: Path, cache_dir: Path, profile=None, progress=True) -> tuple:
    """analyze + build (`mlx-ltc build`): the dataset in `out` at the config's sequence length, or the
    derived one when it has none, and the analysis."""
    corpus = data.Corpus.cached(scan, tokenizer, cfg.data, cache_dir, log=_log, progress=progress)
    analysis = corpus.analysis(profile)
    meta = data.build(corpus, out, cfg.data.seq_len or analysis.constant("seq_len"), analysis, progress=progress)
    _log(data_summary(meta))
    return meta, analysis


def data_summary(meta: data.DatasetMeta) -> str:
    s = meta.splits
    line = (
        f"data: {meta.files} files -> {s['train'].sequences} / {s['val'].sequences} / "
        f"{s['test'].sequences} train/val/test sequences of {meta.seq_len:,} tokens; "
        f"packing efficiency {meta.packing_efficiency:.3f}"
    )
    extras = [f"{n} {k}" for k, n in sorted(meta.documents.items()) if k != "file"]
    if meta.skipped:
        extras.append("skipped " + ", ".join(f"{n} {r}" for r, n in sorted(meta.skipped.items())))
    if meta.cache.cached:
        extras.append(f"{meta.cache.cached} files from cache")
    return line + (f" ({'; '.join(extras)})" if extras else "") + "\n" + mix_summary(meta)


def mix_summary(meta: data.DatasetMeta) -> str:
    """One line per split: its tokens by document kind, with the chains' share."""
    lines = []
    for name, kinds in (meta.mix or {}).items():
        total = sum(kinds.values())
        parts = ", ".join(f"{kind} {n:,}" for kind, n in sorted(kinds.items()))
        chains = f" (chains {kinds.get('chain', 0) / total:.0%})" if total else ""
        lines.append(f"  {name}: {total:,} tokens: {parts}{chains}")
    cap = meta.config.get("chain_share", 1.0)  # datasets built before the cap have no key
    head = "data mix" + (f" (chains capped at {cap:.0%} of each split)" if cap < 1 else "")
    return head + ":\n" + "\n".join(lines)


def default_out(repo: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{repo.resolve().name or 'repo'}-{stamp}"


def run_train(cfg: Config, repo: Path, out: Path, *args, **kwargs) -> TrainReport | None:
    """`_run_train`, with a lost peer under mlx.launch reported in one line."""
    with distributed.world().guard(lambda: _resume_hint(Path(out))):
        return _run_train(cfg, repo, out, *args, **kwargs)


def _resume_hint(out: Path) -> str:
    return f"; continue with mlx-ltc train --resume {out}" if _training_began(out) else ""


def _run_train(
    cfg: Config,
    repo: Path,
    out: Path,
    overwrite: bool = False,
    cache_dir=None,
    progress: bool = True,
    given: dict | None = None,
) -> TrainReport:
    """`given` maps "section.key" to "flag" or "file" for the values the user set (config.build_given).
    Returns None on a rank other than the main one."""
    started = time.perf_counter()
    world = distributed.world()
    out = Path(world.broadcast_json(str(out)))  # a default --out is stamped with the main rank's clock
    world.agree("the mlx-ltc version", __version__)
    world.agree("--overwrite", overwrite)
    world.agree("the settings", {"config": cfg.to_dict(), "given": given, "repo": str(repo)})
    check_world(cfg, world)
    if not world.main:
        return _follow_main(cfg, repo, cache_dir, progress, world)
    verdict = run_dir(out).check(overwrite)
    scan = data.scan(repo, cfg.data.max_file_bytes)  # cheap input errors before any model work
    if cfg.orchestrator.report_to == "wandb":
        from mlx_ltc.train.trainer import require_wandb

        require_wandb()
    cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
    compute_with = backend.get(cfg.train.backend)
    plan.check(cfg, compute_with)
    _log(f"model: resolving {cfg.model.name}")
    model_dir = models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size)
    loaded = compute_with.load(model_dir, cfg, _log)
    given = given if given is not None else {}
    policy = plan.memory_policy(cfg, given, compute_with, loaded)
    memory = plan.effective_memory(cfg, policy)
    profile = cached_profile(cfg.model.name, memory, cache_dir) if compute_with.name == "mlx" else None
    corpus = data.Corpus.cached(scan, loaded.tokenizer, cfg.data, cache_dir, log=_log, progress=progress)
    analysis = corpus.analysis(profile)
    run_plan = plan.resolve(cfg, given, compute_with, policy, analysis.constants, profile, loaded)
    _log(run_plan.describe())
    cfg = run_plan.config
    check_engine(cfg, compute_with, loaded)
    compute_with.prepare(loaded, cfg)
    staging = out.parent / f".{out.name}.data.tmp"  # the dataset is moved into the run directory below
    meta = data.build(corpus, staging, cfg.data.seq_len, analysis, progress=progress)
    _log(data_summary(meta))
    if meta.splits["train"].sequences == 0 or meta.splits["val"].sequences == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(
            f"repo {scan.root} is too small to hold out validation files: "
            f"{len(meta.files_by_split['train'])} train / {len(meta.files_by_split['val'])} val files"
        )
    if world.distributed:
        world.barrier()  # the caches are warm: the other ranks build their copies now
        world.broadcast_json(cfg.to_dict())
        try:
            world.agree("the dataset (build it from the same repository on every host)", dataset_hash(staging))
        except UserError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    compute = {
        **hardware.describe(),
        "backend": compute_with.name,
        "dequantized": loaded.dequantized,
        "dtype": loaded.dtype,
        "fixes": loaded.fixes,
    }
    run_dir(out).create(verdict)  # only now that the inputs are known to be good
    staging.rename(out / "data")
    run_plan.save(out)
    plan.RunInfo(cfg.to_dict(), str(model_dir), str(scan.root), compute, __version__, sys.argv).save(out)
    return _train_and_report(cfg, compute_with, loaded, out, progress, started, cache_dir, world=world)


def check_world(cfg: Config, world) -> None:
    """What a distributed run can't do, in one line on every rank."""
    if cfg.memory.context_parallel and not world.distributed:
        raise UserError(
            "memory.context_parallel shares each sequence between ranks: start the run with "
            "mlx.launch -n 2 (or --hosts/--hostfile) -- mlx-ltc train ..."
        )
    if world.distributed and cfg.train.backend != "mlx":
        raise UserError(f"--backend {cfg.train.backend} trains in one process; drop mlx.launch or use --backend mlx")
    m = cfg.memory
    named = m.policy not in ("auto", "custom", "engine", "engine_sqrt")
    if m.context_parallel and (named or not m.staged or m.attention != "efficient"):
        raise UserError(
            f"memory.context_parallel needs memory.policy engine or engine_sqrt (the engine's staged steps and "
            f"attention), not {m.policy if named else 'staged: false or attention: stock'}"
        )


def check_engine(cfg: Config, compute_with, loaded) -> None:
    if cfg.memory.context_parallel and not compute_with.engine_supports(loaded):
        kind = getattr(loaded, "config", {}).get("model_type")
        raise UserError(
            f"memory.context_parallel runs on the memory engine, which does not support {kind!r} models "
            "(llama and starcoder2 without sliding-window layers)"
        )
    if cfg.memory.context_parallel and not (cfg.memory.staged and cfg.memory.attention == "efficient"):
        raise UserError(f"memory.context_parallel needs memory.policy engine or engine_sqrt, not {cfg.memory.policy}")


def dataset_hash(data_dir: Path) -> str:
    """What must be equal on every rank: the train and val splits' tokens and weights."""
    h = hashlib.sha256()
    for name in ("train", "val"):
        split = data.load_split(Path(data_dir), name)
        for a in (split.tokens, split.weights):
            h.update(a.tobytes())
    return h.hexdigest()


def _follow_main(cfg: Config, repo: Path, cache_dir, progress: bool, world, resumed_config=None, max_steps=None):
    """A rank other than the main one: the same model and dataset as the main rank's, privately; train."""
    if resumed_config is None:
        world.barrier()  # the main rank has checked its inputs and warmed the caches
        cfg = config_module.build(None, world.broadcast_json(None))
    else:
        cfg = config_module.build(None, resumed_config)
    cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
    compute_with = backend.get(cfg.train.backend)
    model_dir = models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size)
    loaded = compute_with.load(model_dir, cfg, lambda msg: None)
    check_engine(cfg, compute_with, loaded)
    compute_with.prepare(loaded, cfg)
    scan = data.scan(repo, cfg.data.max_file_bytes)
    corpus = data.Corpus.cached(scan, loaded.tokenizer, cfg.data, cache_dir, log=lambda m: None, progress=False)
    _sweep_private_dirs()
    private = Path(tempfile.mkdtemp(prefix=f"mlx-ltc-rank{world.rank}-pid{os.getpid()}-"))
    try:
        data.build(corpus, private / "data", cfg.data.seq_len, corpus.analysis(None), progress=False)
        world.agree("the dataset (build it from the same repository on every host)", dataset_hash(private / "data"))
        train_split, val_split = data.load_split(private / "data", "train"), data.load_split(private / "data", "val")
        compute_with.apply_lora(loaded.model, cfg)
        compute_with.train(loaded.model, train_split, val_split, cfg, private / "run", False,
                           resume=resumed_config is not None, max_steps=max_steps, world=world)  # fmt: skip
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return None


def _sweep_private_dirs() -> None:
    """Remove the private directories of ranks that were killed (mlx.launch stops a job with SIGTERM)."""
    for path in Path(tempfile.gettempdir()).glob("mlx-ltc-rank*-pid*-*"):
        try:
            pid = int(path.name.split("-pid")[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def resume_train(run_dir: Path, max_steps=None, cache_dir=None, progress: bool = True) -> TrainReport | None:
    """`mlx-ltc train --resume RUN_DIR`: continue an interrupted run from its newest whole checkpoint."""
    with distributed.world().guard(lambda: _resume_hint(Path(run_dir))):
        return _resume_train(run_dir, max_steps, cache_dir, progress)


def _resume_train(run_dir: Path, max_steps=None, cache_dir=None, progress: bool = True) -> TrainReport | None:
    from mlx_ltc import config

    started = time.perf_counter()
    run_dir = Path(run_dir)
    world = distributed.world()
    world.agree("the mlx-ltc version", __version__)
    world.agree("the command", [str(run_dir), max_steps])
    if not world.main:
        resumed = world.broadcast_json(None)
        return _follow_main(None, Path(resumed["repo"]), cache_dir, progress, world, resumed["config"], max_steps)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"--resume {run_dir}: not an mlx-ltc run directory (no config.json)")
    if (run_dir / COMPLETE).exists():
        raise UserError(f"--resume {run_dir}: the run is already complete")
    if not _training_began(run_dir):  # its base eval comes after training: a stopped run has none yet
        raise UserError(f"--resume {run_dir}: the run stopped before training began; start it again")
    info = plan.RunInfo.read(run_dir)
    run_plan = plan.load(run_dir)  # runs from before plans: config.json holds the resolved config
    cfg = run_plan.config if run_plan else config.build(None, info.config)
    compute_with = backend.get(cfg.train.backend)
    if compute_with.name != "mlx":
        raise UserError("--resume needs the mlx backend: the torch reference writes no checkpoints")
    check_world(cfg, world)
    world.broadcast_json({"config": cfg.to_dict(), "repo": info.repo})
    cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
    model_dir = info.base_model_dir(cfg, cache_dir)
    loaded = compute_with.load(model_dir, cfg, _log)
    check_engine(cfg, compute_with, loaded)
    compute_with.prepare(loaded, cfg)
    if world.distributed:
        world.agree("the dataset (build it from the same repository on every host)", dataset_hash(run_dir / "data"))
    return _train_and_report(cfg, compute_with, loaded, run_dir, progress, started, cache_dir, True, max_steps,
                             world=world)  # fmt: skip


def _training_began(run_dir: Path) -> bool:
    """Training writes a checkpoint before its first step (`Trainer.start`); unfinished ones are hidden."""
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in ckpts.iterdir())


def base_eval(compute_with, model, val_split, cfg, out: Path, progress: bool, resume=False):
    """The base model's validation perplexity, measured after training with the adapters switched off:
    the numbers of the model before LoRA, without a pass over the whole validation split before the first
    training step. Written to BASE_EVAL, which a resumed run reads if the run got that far (or measured
    it before training, as runs did before this order)."""
    path = out / BASE_EVAL
    if resume and path.is_file():
        return Perplexity.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    _log("eval: base model (adapters off)")
    with compute_with.adapters_off(model):
        base = compute_with.perplexity(model, val_split, cfg.train.eval_batch_size, "eval base", progress)
    _log(f"eval: base val loss {base.loss:.4f}, ppl {base.ppl:.3f}")
    atomic.write_json(path, asdict(base))
    return base


def _train_and_report(
    cfg, compute_with, loaded, out, progress, started, cache_dir, resume=False, max_steps=None, world=None
):
    info = plan.RunInfo.read(out)
    meta = data.load_metadata(out / "data")
    if meta.tokenizer_hash != data.tokenizer_hash(loaded.tokenizer):
        raise UserError(f"{out / 'data'} was built with another tokenizer than {cfg.model.name}'s")
    train_split, val_split = data.load_split(out / "data", "train"), data.load_split(out / "data", "val")
    adapter_config = compute_with.apply_lora(loaded.model, cfg)
    adapter_config.update(
        {
            "model": cfg.model.name,
            "base_model_dir": info.model_dir,
            "seq_len": cfg.data.seq_len,
            "tokenizer_hash": meta.tokenizer_hash,
        }
    )
    result = compute_with.train(loaded.model, train_split, val_split, cfg, out, progress, resume, max_steps, world)
    compute_with.save_adapters(loaded.model, out / "adapters", adapter_config)
    base = base_eval(compute_with, loaded.model, val_split, cfg, out, progress, resume)
    adapted = compute_with.perplexity(loaded.model, val_split, cfg.train.eval_batch_size, "eval adapted", progress)
    if compute_with.name == "mlx":
        beyond = final_measures(cfg, loaded, out, meta, Path(info.repo), cache_dir, progress)
    else:
        beyond = {"notes": ["--backend torch: no completion benchmark or forgetting check (they run on MLX)"]}

    report = TrainReport(
        mlx_ltc_version=__version__,
        model=cfg.model.name,
        model_dir=info.model_dir,
        adapter_dir=str(out / "adapters"),
        repo=info.repo,
        compute=info.compute,
        data=DataSummary(
            seq_len=meta.seq_len,
            sequences={k: v.sequences for k, v in meta.splits.items()},
            packing_efficiency=meta.packing_efficiency,
            skipped=meta.skipped,
            files={k: len(v) for k, v in meta.files_by_split.items()},
            mix=meta.mix,
        ),
        base=ValNumbers.of(base),
        adapted=ValNumbers.of(adapted),
        train=result,
        **beyond,
        wall_s=time.perf_counter() - started,
        resumed=resume,
    )
    atomic.write_json(out / "report.json", report.to_json())
    atomic.write_text(out / "summary.txt", summary(report))
    run_dir(out).complete()
    return report


def final_measures(cfg, loaded, out: Path, meta: data.DatasetMeta, repo: Path, cache_dir: Path, progress: bool) -> dict:
    """What the report measures after training beside validation perplexity, for the base model (the
    adapters switched off) and the adapted one: the forgetting check and the completion benchmark at
    the trained length, as TrainReport fields. A problem with either is a note in the report, never a
    lost run."""
    from mlx_ltc.eval import completion, forgetting, perplexity
    from mlx_ltc.eval.report import TRAIN_RECORDS
    from mlx_ltc.train.lora import adapters_off

    model, tokenizer, e = loaded.model, loaded.tokenizer, cfg.eval
    found, notes = {}, []
    if e.forgetting_tokens:
        sample, source = forgetting.sample(tokenizer, e.forgetting_tokens, cfg.data.seq_len)
        with adapters_off(model):
            before = perplexity(model, sample, cfg.train.eval_batch_size, "forgetting: base", progress)
        after = perplexity(model, sample, cfg.train.eval_batch_size, "forgetting: adapted", progress)
        found["forgetting"] = source.scored(base=before, adapted=after)
        _log(f"eval: {source.source}: perplexity base {before.ppl:.3f} -> adapted {after.ppl:.3f}")
    modes = [m for m in e.completion_modes if m != "fim" or loaded_has_fim(tokenizer)]
    if e.completion_targets and modes:
        opts = completion.CompletionOptions(e.completion_targets, (cfg.data.seq_len,), tuple(modes))
        started = time.perf_counter()
        try:
            corpus = data.Corpus.cached(data.scan(repo, cfg.data.max_file_bytes), tokenizer, cfg.data, cache_dir,
                                        log=lambda m: None, progress=False)  # fmt: skip
            bench = completion.Benchmark.build(corpus, meta, opts)
        except UserError as err:
            notes.append(f"no completion benchmark: {err}")
        else:
            measure = lambda name: completion.measure(model, tokenizer, bench, name, opts.max_tokens, progress=progress)  # noqa: E731
            with adapters_off(model):
                results = {"base": measure("base")}
            results["adapted"] = measure("adapted")
            found.update(completion.section(bench, results, opts, time.perf_counter() - started))
            atomic.write_jsonl(out / TRAIN_RECORDS, completion.records(bench, results))
    if len(modes) < len(e.completion_modes):
        notes.append("completion mode fim left out: this tokenizer has no FIM tokens")
    for note in notes:
        _log(f"eval: {note}")
    return {**found, "notes": notes}


def loaded_has_fim(tokenizer) -> bool:
    return data.markers(tokenizer).fim is not None


def _ppl_change(before, after) -> str:
    return f"base {before:.3f} -> adapted {after:.3f} ({(after / before - 1) * 100:+.1f}%)"


def summary(report: TrainReport) -> str:
    from mlx_ltc.eval import completion

    t, files = report.train, report.data.files
    head, lines = _perplexity_lines(report)
    forgot = report.forgetting
    if forgot:
        lines.append(
            f"  outside the repo ({forgot.source}, {forgot.tokens:,} tokens): "
            f"{_ppl_change(forgot.base.ppl, forgot.adapted.ppl)}"
        )
    line = completion.headline(report.completion or [])
    if line:
        lines.append(f"  {line}")
    lines += [f"  note: {n}" for n in report.notes or []]
    minutes, seconds = divmod(int(t.wall_s), 60)
    run = Path(report.adapter_dir).parent
    return (
        f"fine-tuned {report.model} on {Path(report.repo).name}: {head}\n"
        + "".join(x + "\n" for x in lines)
        + f"  training: {t.steps} steps, {t.tokens:,} tokens in {minutes}m{seconds:02d}s "
        f"({t.tokens_per_s:.0f} tokens/s), peak memory {t.peak_memory_gb:.2f} GB; "
        f"{files['train']} train files\n"
        + (f"  run ended: {t.curriculum['stopped']}\n" + t.curriculum["tables"] if t.curriculum else "")
        + f"  adapters: {report.adapter_dir}\n"
        f"  try: mlx-ltc complete {run} --file PATH --line N   (writes line N of a file)\n"
        f"       mlx-ltc serve {run}   (completions for an editor: OpenAI /v1/completions, llama.cpp /infill)\n"
    )


def _perplexity_lines(report: TrainReport) -> tuple:
    """(headline, lines): validation perplexity before and after, of held-out files and their commit chains."""
    b, a = report.base, report.adapted
    if not (a.file_ppl and b.file_ppl):  # a report from before perplexity was split by document kind
        return f"validation perplexity {_ppl_change(b.val_ppl, a.val_ppl)}", []
    lines = [
        f"  held-out files ({report.data.files['val']} val files): {_ppl_change(b.file_ppl, a.file_ppl)}, "
        f"over {a.file_tokens:,} tokens"
    ]
    if a.chain_ppl and b.chain_ppl:
        lines.append(f"  their commit chains: {_ppl_change(b.chain_ppl, a.chain_ppl)}, over {a.chain_tokens:,} tokens")
    return f"held-out files' perplexity {_ppl_change(b.file_ppl, a.file_ppl)}", lines
