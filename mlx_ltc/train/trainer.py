"""The training loop of a run: phases, orchestrator, stability guards, checkpoints, metrics.

Everything the loop depends on lives in its checkpoints (adapters, optimizer, TrainerState,
orchestrator and stability state, the phase plan); the batch order is a pure function of
(seed, phase, cursor) and MLX's random key of (seed, attempt). So a run killed anywhere and resumed
from its last checkpoint repeats the same steps with the same numbers as if it had never stopped.

Files in the run directory: `metrics.jsonl`, one line per optimizer step of the run's current
history (a rollback or a resume cuts it back to the checkpoint); `events.jsonl`, every decision and
incident ever, append-only, each with its inputs.

Under `mlx.launch` every rank runs this loop on the same state: the gradients, the loss and the
validation numbers are summed over the ranks (`Updater`, `eval.position_nll`), so every rank makes the
same decisions. The main rank alone writes the run directory and reads checkpoints back; the others get
them from it (`distributed.World.broadcast_*`).
"""

import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_ltc import hardware
from mlx_ltc.config import Config
from mlx_ltc.data import Split
from mlx_ltc.distributed import World
from mlx_ltc.errors import Interrupted, UserError
from mlx_ltc.runtime.checkpoints import Checkpoints
from mlx_ltc.runtime.interrupt import StopRequest
from mlx_ltc.runtime.metrics import MetricsLog
from mlx_ltc.train import phases, summary
from mlx_ltc.train.result import TrainResult
from mlx_ltc.train.update import Updater, enable_grad_checkpoint
from mlx_ltc.train.batches import endless_indices
from mlx_ltc.runtime import stability
from mlx_ltc.runtime.events import Event
from mlx_ltc.runtime.stability import StabilityState
from mlx_ltc.train.orchestrator import Orchestrator, context_gain


@dataclass
class TrainerState:
    step: int = 0  # optimizer updates applied
    phase: int = 0
    phase_step: int = 0
    cursor: int = 0  # micro-batches drawn in this phase
    attempts: int = 0  # update attempts, skipped ones included; not rolled back
    tokens: int = 0
    train_s: float = 0.0  # seconds spent in updates and evals, not counting downtime
    weight_decay: float = 0.0
    train_ema: float | None = None
    last_loss: float = math.nan
    done: str | None = None  # why the run ended
    plan: list = field(default_factory=list)  # the phases, as dicts


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


class Trainer:
    def __init__(
        self,
        model,
        train_split: Split,
        val_split: Split,
        cfg: Config,
        run_dir: Path,
        log=_log,
        progress: bool = True,
        world: World | None = None,
    ):
        if len(train_split) == 0:
            raise UserError("the training split is empty")
        self.world = world = world or World()
        if not world.main:  # one voice: the main rank's
            log, progress = (lambda msg: None), False
        self.model, self.train_split, self.cfg, self.log, self.progress = model, train_split, cfg, log, progress
        self.bar = None  # the progress bar while run() runs
        self.run_dir = Path(run_dir)
        self.val = val_split.rows(slice(0, cfg.orchestrator.eval_sequences))
        if cfg.train.grad_checkpoint and not cfg.memory.staged:
            enable_grad_checkpoint(model)
        self.updater = Updater(model, cfg.train, cfg.memory, world)
        self.checkpoints = Checkpoints(self.run_dir, cfg.checkpoint.keep_last, log)
        self.orchestrator = Orchestrator(cfg.orchestrator)
        self.stability = StabilityState()
        self.state = TrainerState(weight_decay=cfg.train.weight_decay)
        self.metrics, self.events_path = MetricsLog(self.run_dir / "metrics.jsonl"), self.run_dir / "events.jsonl"
        self.pending = []  # events to show on the next metrics line
        self.stop = StopRequest(log)
        self.wandb = None
        self._data = {}

    # --- plan and data -------------------------------------------------------------------------
    @property
    def plan(self) -> list:
        return [phases.Phase(**p) for p in self.state.plan]

    @property
    def phase(self) -> phases.Phase:
        return phases.Phase(**self.state.plan[self.state.phase])

    def _batches(self, phase: phases.Phase):
        """The phase's endless, seeded batch stream, positioned at the state's cursor."""
        if phase.index not in self._data:
            self._data = {phase.index: phases.view(self.train_split, phase.seq_len, phase.band)}
        split = self._data[phase.index]
        order = endless_indices(len(split), phase.micro_batch, self.cfg.train.seed + 1000 * phase.index)
        for idx in itertools.islice(order, self.state.cursor, None):
            yield mx.array(split.tokens[idx]), mx.array(split.weights[idx]), split.real[idx]

    def _eval_every(self, phase: phases.Phase) -> int:
        return self.cfg.orchestrator.eval_every or max(1, phase.steps // 8)

    # --- state ---------------------------------------------------------------------------------
    def _state_dict(self) -> dict:
        return {
            "trainer": asdict(self.state),
            "orchestrator": self.orchestrator.to_dict(),
            "stability": self.stability.to_json(),
            "good": self.stability.good,
        }

    def save(self, why: str) -> None:
        if not self.world.main:
            return
        keep = {self.orchestrator.state.best_step}
        opt_state = dict(tree_flatten(self.updater.optimizer.state))
        adapters = dict(tree_flatten(self.model.trainable_parameters()))
        path = self.checkpoints.save(self.state.step, adapters, opt_state, self._state_dict(), keep=keep)
        self._event(Event(self.state.step, "checkpoint", why, {"path": str(path)}), show=False)

    def _restore(self, step, adapters, optimizer, state, everything: bool) -> None:
        self.model.update(tree_unflatten(list(adapters.items())))
        self.updater.optimizer.state = tree_unflatten(list(optimizer.items()))
        self.orchestrator = Orchestrator.from_dict(self.cfg.orchestrator, state["orchestrator"])
        restored = StabilityState.from_json(state["stability"])
        trainer = TrainerState(**state["trainer"])
        if everything:
            self.stability, self.state = restored, trainer
        else:  # a rollback: the counts, the attempts and the data position go on
            stability.rolled_back(self.stability, restored)
            keep = self.state
            trainer.attempts, trainer.train_s = keep.attempts, keep.train_s
            if trainer.phase == keep.phase:
                trainer.cursor = keep.cursor  # the batches that went wrong are not replayed
            self.state = trainer
        self.updater.optimizer.weight_decay = self.state.weight_decay
        mx.eval(self.model.trainable_parameters(), self.updater.optimizer.state)
        self._cut_metrics(step)

    def _load(self, at_most: int | None = None, good_only: bool = False):
        """`Checkpoints.load` on the main rank, its result on every rank."""
        world = self.world
        found = self.checkpoints.load(at_most, good_only) if world.main else None
        if not world.distributed:
            return found
        head = world.broadcast_json(None if found is None else [found[0], found[3]])
        if head is None:
            return None
        adapters = world.broadcast_arrays(found[1] if found else None)
        optimizer = world.broadcast_arrays(found[2] if found else None)
        return head[0], adapters, optimizer, head[1]

    def _cut_metrics(self, step: int) -> None:
        if self.world.main:
            self.metrics.keep(lambda r: r["step"] <= step)

    def rows(self) -> list:
        return self.metrics.rows()

    # --- start / resume --------------------------------------------------------------------------
    def start(self, total_steps: int) -> None:
        self.state.plan = [p.to_dict() for p in phases.plan(self.cfg, total_steps)]
        self.model.train()
        if self.world.main:
            self.metrics.start()
        self._describe_plan()
        self.save("start")

    def resume(self, max_steps: int | None = None) -> None:
        found = self._load()
        if found is None:
            raise UserError(f"{self.run_dir} has no usable checkpoint to resume from")
        step, adapters, optimizer, state = found
        self._restore(step, adapters, optimizer, state, everything=True)
        if max_steps is not None:
            self._set_total(max_steps)
        self.model.train()
        self._event(Event(step, "resume", f"resumed from the checkpoint at step {step}"))

    def _set_total(self, max_steps: int) -> None:
        """Move the end of the run: the last phase's budget absorbs the difference."""
        plan, done = self.state.plan, sum(p["steps"] for p in self.state.plan[:-1])
        if max_steps == done + plan[-1]["steps"]:
            return
        if max_steps <= self.state.step or max_steps <= done:
            raise UserError(
                f"--max-steps {max_steps}: the run is already at step {self.state.step} "
                f"(its last phase starts after step {done})"
            )
        plan[-1]["steps"] = max_steps - done
        if self.state.done == "schedule":
            self.state.done = None

    def _describe_plan(self) -> None:
        for p in self.plan:
            self.log(
                f"phase {p.index + 1}/{len(self.plan)}: {p.steps} updates at {p.seq_len:,} tokens "
                f"({p.micro_batch} x {p.grad_accum} sequences per update), LR x{p.lr_mult:g}, "
                f"easiest {p.band:.0%} of the sequences"
            )

    # --- events --------------------------------------------------------------------------------
    def _event(self, event: Event, show: bool = True) -> None:
        if not self.world.main:
            return
        row = {**event.to_dict(), "attempt": self.state.attempts, "phase": self.state.phase}
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if show:
            self.pending.append(event.short())
            if event.kind not in ("spike", "skip"):
                self.log(f"step {event.step}: {event.short()}")

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from mlx_ltc import progress as progress_bars

        total = sum(p["steps"] for p in self.state.plan)
        self._init_wandb()
        hardware.reset_peak_memory()
        bar = progress_bars.bar(total=total, initial=self.state.step, desc="train", unit="step", enabled=self.progress)
        self.bar = bar
        try:
            with self.stop:
                self._loop(bar)
        finally:
            bar.close()
            self.bar = None
            if self.wandb is not None:
                self.wandb.finish()
        n = sum(p.size for _, p in tree_flatten(self.model.trainable_parameters()))
        state = self.state
        report = self.report() if self.world.main else {}
        return TrainResult(state.step, state.tokens, state.train_s, state.tokens / max(state.train_s, 1e-9),
                           hardware.peak_memory_gb(), state.last_loss, n, report)  # fmt: skip

    def _loop(self, bar) -> None:
        while not self.state.done:
            stream, more = self._batches(self.phase), True
            while more:
                more = self._attempt(stream)
                state = self.state
                bar.set_postfix(
                    phase=state.phase + 1, L=self.phase.seq_len, loss=f"{state.last_loss:.3f}", refresh=False
                )
                bar.update(state.step - bar.n)  # negative after a rollback
                if self.world.any(self.stop.requested) and not self.state.done:  # every rank stops here
                    self.save("interrupted (Ctrl-C)")
                    raise Interrupted(  # said once, by the main rank: the others' run_dir is private
                        f"interrupted: saved a checkpoint at step {self.state.step}; continue with "
                        f"mlx-ltc train --resume {self.run_dir}"
                        if self.world.main
                        else ""
                    )

    def report(self) -> dict:
        """Summary tables and plots/training.png from the run's metrics and events."""
        rows, counted = self.rows(), self.stability
        events = [json.loads(line) for line in self.events_path.read_text(encoding="utf-8").splitlines()]
        by_phase, by_length = summary.phase_rows(rows, events), summary.length_rows(rows, counted.by_length)
        counts = {"spikes": counted.spikes, "skipped": counted.skipped, "rollbacks": counted.rollbacks}
        if rows:
            summary.plot(rows, events, self.run_dir / "plots" / "training.png")
        kinds = {}
        for e in events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        tables = summary.tables(by_phase, by_length, counts)
        return {"plan": self.state.plan, "stopped": self.state.done, "phases": by_phase, "lengths": by_length,
                "stability": counts, "events": kinds, "tables": tables}  # fmt: skip

    def _attempt(self, stream) -> bool:
        """One update attempt. False when the stream must be rebuilt (new phase, rollback) or the run ended."""
        state, phase, rules = self.state, self.phase, self.cfg.stability
        started = time.perf_counter()
        micro = [next(stream) for _ in range(phase.grad_accum)]
        state.cursor += phase.grad_accum
        state.attempts += 1
        mx.random.seed(self.cfg.train.seed * 1_000_003 + state.attempts)  # LoRA dropout's draws follow the state
        grads, loss, tokens = self.updater.gradients(micro)
        if state.attempts in rules.inject_nan:
            grads, loss = tree_map(lambda g: g * math.nan, grads), math.nan
        if state.attempts in rules.inject_spike:
            grads, loss = tree_map(lambda g: g * 8, grads), loss * 8
        grads, grad_norm = self.updater.clip(grads)
        apply, events = stability.check(self.stability, rules, state.step + 1, loss, grad_norm, phase.seq_len)
        lr = phases.lr_at(self.cfg.train, phase, state.phase_step, self.orchestrator.state.lr_factor)
        if apply:
            self.updater.apply(grads, lr)
            state.step += 1
            state.phase_step += 1
            state.tokens += tokens
            state.last_loss = loss
            state.train_ema = loss if state.train_ema is None else 0.9 * state.train_ema + 0.1 * loss
        state.train_s += time.perf_counter() - started
        for e in events:
            self._event(e)
        if any(e.kind == "unstable" for e in events):
            self._rollback()
            return False
        if not apply:
            return True
        row = {"step": state.step, "phase": state.phase + 1, "seq_len": phase.seq_len, "loss": loss, "lr": lr,
               "grad_norm": grad_norm, "tokens": state.tokens}  # fmt: skip
        if self.world.distributed:
            u = self.updater
            row.update({"ranks": self.world.size, "wait_s": u.wait_s, "all_reduce_s": u.all_reduce_s})
        decisions = []
        if state.phase_step % self._eval_every(phase) == 0 or state.phase_step >= phase.steps:
            decisions = self._evaluate(row, last=state.phase == len(state.plan) - 1)
        for e in decisions:  # on this step's line; acted on once the line is written (checkpoints follow it)
            self._event(e, show=e.kind != "best")
        counted = self.stability
        row.update(
            {
                "tokens_per_s": state.tokens / max(state.train_s, 1e-9),
                "peak_memory_gb": hardware.peak_memory_gb(),
                "elapsed_s": state.train_s,
                "spikes": counted.spikes,
                "skipped": counted.skipped,
                "rollbacks": counted.rollbacks,
                "events": self.pending,
            }
        )
        self.pending = []
        if self.world.main:
            self.metrics.append(row)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "events"}, step=state.step)
        return self._decide(decisions, phase)

    def _evaluate(self, row: dict, last: bool) -> list:
        from mlx_ltc.eval import position_nll

        started = time.perf_counter()
        if self.bar is not None:  # a validation takes tens of seconds: say so, on a terminal and in a log
            self.bar.set_description_str("train (validating)", refresh=True)
        split = phases.view(self.val, self.phase.seq_len)
        # Decisions follow the held-out files' loss (the headline), commit chains are logged beside it.
        nll_fn = self.updater.step_fn.target_nll if self.updater.context_parallel else None
        measured, total, count = position_nll(
            self.model, split, self.cfg.train.eval_batch_size, only="file", world=self.world, nll_fn=nll_fn
        )
        loss = measured.by_kind["file"]["loss"] if "file" in measured.by_kind else measured.loss
        self.model.train()
        if self.bar is not None:
            self.bar.set_description_str("train", refresh=False)
        gain = context_gain(total / count.clip(min=1))
        self.state.train_s += time.perf_counter() - started
        row.update({"val_loss": loss, "val_ppl": math.exp(loss), "context_gain": gain, "val_all_loss": measured.loss})
        row.update({f"val_{kind}_loss": k["loss"] for kind, k in measured.by_kind.items()})
        before = self.orchestrator.state.best_step
        spent = self.state.phase_step / self.phase.steps
        decisions = self.orchestrator.on_eval(self.state.step, loss, self.state.train_ema, gain, last, spent)
        steering = self.orchestrator.state
        if steering.best_step != before and steering.best_step == self.state.step:
            why = f"new best smoothed val loss {steering.best:.4f} in phase {self.state.phase + 1}"
            decisions.insert(0, Event(self.state.step, "best", why))
        return decisions

    def _decide(self, decisions: list, phase: phases.Phase) -> bool:
        state = self.state
        saved = False
        for e in decisions:
            if e.kind == "restore_best":
                self._restore_best(regularize=not any(d.kind == "stop" for d in decisions))
            elif e.kind == "stop":
                state.done = e.reason
            elif e.kind == "advance":
                return self._advance(e.reason)
            elif e.kind == "best":
                saved = True
        every = self.cfg.checkpoint.save_every
        if state.phase_step >= phase.steps and not state.done:
            return self._advance("schedule: the phase's budget is spent")
        if state.done or saved or (every and state.step % every == 0):
            self.save("end: " + state.done if state.done else "new best" if saved else f"every {every} steps")
        return not state.done

    def _advance(self, why: str) -> bool:
        state = self.state
        if state.phase + 1 >= len(state.plan):
            state.done = "schedule"
            self.save("end of the last phase")
            return False
        left = state.plan[state.phase]["steps"] - state.phase_step  # an early advance hands its unused updates on
        state.plan[state.phase]["steps"] = state.phase_step
        state.plan[state.phase + 1]["steps"] += left
        state.phase, state.phase_step, state.cursor = state.phase + 1, 0, 0
        self.orchestrator.new_phase()
        nxt = self.phase
        self._event(Event(state.step, "phase", f"phase {state.phase + 1} at {nxt.seq_len:,} tokens ({why})",
                          {"seq_len": nxt.seq_len, "lr_mult": nxt.lr_mult, "band": nxt.band, "steps": nxt.steps,
                           "inherited": left}))  # fmt: skip
        self.save(f"start of phase {state.phase + 1}")
        return False

    def _restore_best(self, regularize: bool) -> None:
        best = self.orchestrator.state.best_step
        found = self._load(at_most=best)
        if found is None or found[0] != best:
            self.log(f"the best checkpoint (step {best}) is gone; keeping the current weights")
            return
        _, adapters, optimizer, _ = found
        self.model.update(tree_unflatten(list(adapters.items())))
        self.updater.optimizer.state = tree_unflatten(list(optimizer.items()))
        if regularize:
            self.state.weight_decay *= 2
            self.updater.optimizer.weight_decay = self.state.weight_decay
        mx.eval(self.model.trainable_parameters(), self.updater.optimizer.state)

    def _rollback(self) -> None:
        counted = self.stability
        if counted.rollbacks >= self.cfg.stability.max_rollbacks:
            raise UserError(
                f"training is unstable: {counted.rollbacks} rollbacks, {counted.spikes} loss spikes, {counted.skipped} "
                f"non-finite updates; lower train.lr (run kept in {self.run_dir})"
            )
        found = self._load(at_most=self.state.step, good_only=True)
        if found is None:
            raise UserError(f"training is unstable and {self.run_dir} has no good checkpoint to roll back to")
        step, adapters, optimizer, state = found
        self._restore(step, adapters, optimizer, state, everything=False)
        steering = self.orchestrator.state
        steering.lr_factor = max(
            self.cfg.orchestrator.min_lr_factor, steering.lr_factor * self.cfg.orchestrator.lr_factor
        )
        if self.world.main:
            self.checkpoints.drop_after(step)
        why = f"restored the checkpoint at step {step}; LR factor now {steering.lr_factor:g}"
        self._event(Event(step, "rollback", why, {"rollbacks": self.stability.rollbacks}))

    def _init_wandb(self) -> None:
        if self.cfg.orchestrator.report_to != "wandb" or not self.world.main:
            return
        wandb = require_wandb()
        self.wandb = wandb
        wandb.init(project="mlx-ltc", name=self.run_dir.name, id=self.run_dir.name, resume="allow",
                   dir=str(self.run_dir), config=self.cfg.to_dict())  # fmt: skip


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("--report-to wandb needs wandb: pip install wandb") from None
    return wandb
