"""Resolve, then execute: the frozen plan of a training run.

The user's config leaves some values open (sequence length, micro-batch, LoRA rank, phases, layers per
stage) and some can't hold for this model or backend (the memory engine on a model it doesn't support).
`resolve` settles all of them once, from the config, the repository's analysis, the cached memory
profile and what the backend can do, and says where each value came from. The run then executes the
plan's config; nothing changes a config after this point. `plan.json` in the run directory holds it, so
a resumed run reads the same plan back instead of deriving it again.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_ltc import atomic, config
from mlx_ltc.config import Config, MemoryConfig
from mlx_ltc.errors import UserError
from mlx_ltc.records import Record
from mlx_ltc.train.policies import POLICIES

if TYPE_CHECKING:
    from mlx_ltc.hardware.profile import Profile

PLAN, INFO = "plan.json", "config.json"
# where a value came from: the command line, the YAML file, the config's default, a config built in code
# (no flag or file to name), the analysis' derived constants, the memory profile, or what the backend allows
SOURCES = ("flag", "file", "default", "config", "derived", "profile", "backend")


@dataclass(frozen=True)
class Choice:
    value: int | str | bool
    source: str
    why: str = ""


@dataclass(frozen=True)
class RunPlan:
    backend: Choice
    seq_len: Choice
    batch_size: Choice
    lora_rank: Choice
    phases: Choice
    attention: Choice
    loss: Choice
    staged: Choice
    layers_per_stage: Choice
    config: Config  # every value above filled in; what the run executes
    policy: Choice = Choice("custom", "config", "a plan from before memory policies")

    def describe(self) -> str:
        """A summary line, then each value with where it came from."""
        phases = f"{self.phases.value} phase" + ("s" if self.phases.value != 1 else "")
        if self.phases.source == "backend":
            phases += f": {self.phases.why}"
        head = (
            f"plan: seq_len {self.seq_len.value}, batch {self.batch_size.value}, "
            f"LoRA rank {self.lora_rank.value}, {phases}"
        )
        rows = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "config"]
        rows = rows[-1:] + rows[:-1]  # the memory policy first: it decides the four below it
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {c.value!s:<9} {c.source}" + (f": {c.why}" if c.why else "") for name, c in rows]
        return head + "\n" + "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "RunPlan":
        choices = {k: Choice(**v) for k, v in doc.items() if k != "config"}
        return cls(**choices, config=config.build(None, doc["config"]))

    def save(self, run_dir: Path) -> None:
        atomic.write_json(Path(run_dir) / PLAN, self.to_json())


@dataclass(frozen=True)
class RunInfo(Record):
    """config.json: what a training run was started from and where it runs (the marker of a run directory)."""

    config: dict  # the resolved config (plan.json's, for runs from before plans the only copy)
    model_dir: str
    repo: str
    compute: dict = dataclasses.field(default_factory=dict)  # hardware, backend, dtype, the model's fixes
    mlx_ltc_version: str = ""
    argv: list = dataclasses.field(default_factory=list)

    def save(self, run_dir: Path) -> None:
        atomic.write_json(Path(run_dir) / INFO, self.to_json())

    def base_model_dir(self, cfg: Config, cache_dir: Path) -> Path:
        """The base model's directory: the one the run used, or the same model resolved again (the cache moved)."""
        from mlx_ltc import models

        path = Path(self.model_dir)
        return (
            path if path.is_dir() else models.resolve(cfg.model.name, cache_dir, cfg.model.bits, cfg.model.group_size)
        )

    @classmethod
    def read(cls, run_dir: Path) -> "RunInfo":
        path = Path(run_dir) / INFO
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not readable ({e.__class__.__name__}: {e})") from None


def load(run_dir: Path) -> RunPlan | None:
    """The run's plan; None for a run written before plans existed (its config.json holds the config)."""
    path = Path(run_dir) / PLAN
    if not path.is_file():
        return None
    try:
        return RunPlan.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path} is not a readable plan ({e})") from None


_PARTS = ("attention", "loss", "staged", "layers_per_stage")


def memory_policy(cfg: Config, given: dict, backend, loaded) -> dict:
    """policy, attention, loss and staged as Choices. A policy named in the config, or `custom` when the user
    set a part of the engine themselves (those settings win over `auto`); `auto` is settled by `resolve`
    once the length and micro-batch are known. The backend or the model may rule the engine out."""
    m = cfg.memory
    unsaid = {
        k: "default" if getattr(m, k) == getattr(MemoryConfig(), k) else "config"
        for k in ("policy", "attention", "loss", "staged")
    }
    choices = {k: Choice(getattr(m, k), given.get(f"memory.{k}", unsaid[k])) for k in unsaid}
    set_parts = [k for k in _PARTS if given.get(f"memory.{k}") in ("flag", "file")]
    if m.policy == "auto" and set_parts:
        choices["policy"] = Choice("custom", given[f"memory.{set_parts[0]}"], f"memory.{set_parts[0]} is set")
    elif m.policy not in ("auto", "custom"):
        p = POLICIES[m.policy]
        choices |= {k: Choice(getattr(p, k), choices["policy"].source, f"policy {p.name}") for k in _PARTS[:3]}
    if not backend.memory_engine:
        why = f"the {backend.name} backend has no memory engine"
        return {
            "policy": Choice("plain", "backend", why),
            "attention": Choice("stock", "backend", why),
            "loss": Choice("full", "backend", why),
            "staged": Choice(False, "backend", why),
        }
    if not backend.engine_supports(loaded) and (choices["attention"].value == "efficient" or choices["staged"].value):
        why = f"the memory engine does not support {loaded.config.get('model_type')!r} models"
        if choices["policy"].value == "auto":  # auto chooses among the rest
            choices["policy"] = Choice("auto", "backend", why)
        else:
            choices["policy"] = Choice("custom", "backend", why)
            choices["attention"] = Choice("stock", "backend", why)
            choices["staged"] = Choice(False, "backend", why)
    return choices


def effective_memory(cfg: Config, policy: dict) -> MemoryConfig:
    """The memory settings a profile is looked up with (auto: the engine's settings as configured)."""
    parts = {k: c.value for k, c in policy.items() if k in _PARTS}
    return dataclasses.replace(cfg.memory, **parts)


def auto_policy(cfg: Config, policy: dict, backend, loaded, seq_len: int, batch: int, profile) -> tuple:
    """(policy name, why): the fastest policy the planner says fits the memory budget at this length and batch."""
    from mlx_ltc.hardware import planner, profile as hw

    engine_ok = policy["policy"].source != "backend"
    candidates = [n for n, p in POLICIES.items() if engine_ok or (p.attention == "stock" and not p.staged)]
    if cfg.lora.dropout > 0:  # recomputation must be deterministic
        candidates = [n for n in candidates if not POLICIES[n].staged]
    if cfg.memory.context_parallel:  # the ranks share positions inside the engine's staged steps
        from mlx_ltc import distributed

        candidates = [n for n in candidates if POLICIES[n].staged and POLICIES[n].attention == "efficient"]
        if not candidates:
            raise UserError("memory.context_parallel needs the memory engine, which this model or backend can't run")
        ranks = distributed.world().size
    try:
        shape = planner.Shape.from_config(getattr(loaded, "config", None) or {}, cfg.model.name)
    except UserError as e:
        fallback = "engine" if "engine" in candidates else candidates[-1]
        return fallback, f"{fallback}: {e}"
    budget = profile.memory_budget if profile else hw.default_budget(hw.machine())
    where = "the memory profile's budget" if profile else "what this machine can give MLX"
    setup = planner.setup_for(loaded, cfg, batch, hw.backend())
    if cfg.memory.context_parallel:
        setup = dataclasses.replace(setup, context_ranks=ranks)
    try:
        result = planner.plan(shape, setup, budget, seq_len, policies=candidates, where=where)
    except UserError as e:  # the weights alone exceed the budget: train as frugally as possible, and say so
        return candidates[-1], f"{candidates[-1]}, the most frugal: {e}"
    if result.auto is None:
        fallback = candidates[-1]
        return fallback, f"{fallback}, the most frugal: {result.why}"
    return result.auto, result.why


def _derived(constants: dict, name: str) -> Choice:
    c = constants[name]
    inputs = ", ".join(f"{k} {v}" for k, v in c.inputs.items())
    return Choice(c.value, "derived", c.formula + (f" ({inputs})" if inputs else ""))


def check(cfg: Config, backend) -> None:
    """What the user asked for that this backend can't do: one clear error before any model loads."""
    if not backend.curriculum and cfg.curriculum.phases > 1:
        raise UserError(
            f"curriculum.phases {cfg.curriculum.phases}: the {backend.name} backend trains one "
            "phase at the dataset's length; use the mlx backend for a curriculum"
        )


def resolve(
    cfg: Config, given: dict, backend, policy: dict, constants: dict, profile: "Profile | None", loaded=None
) -> RunPlan:
    """The frozen plan. `given` maps "section.key" to "flag" or "file" for the values the user set;
    `policy` is `memory_policy`'s; `constants` the analysis' derived constants (computed at the given
    sequence length when there is one); `profile` the cached memory profile or None."""

    defaults = Config()

    def user(key: str) -> Choice:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        unsaid = "default" if value == getattr(getattr(defaults, section), name) else "config"
        return Choice(value, given.get(key, unsaid))

    backend_choice = user("train.backend")
    if cfg.data.seq_len is not None:  # set by the user, whether or not `given` says where
        seq_len = user("data.seq_len")
    else:
        seq_len = _derived(constants, "seq_len")
    if cfg.lora.rank is not None:
        rank = user("lora.rank")
    else:
        rank = _derived(constants, "lora_rank")

    check(cfg, backend)
    if not backend.curriculum:
        phases = Choice(1, "backend", f"the {backend.name} backend has no curriculum")
    elif cfg.curriculum.phases:
        phases = user("curriculum.phases")
    else:
        phases = _derived(constants, "phases")

    budget = f"memory profile: longest step {profile.max_seq_len:,} tokens" if profile else ""
    if cfg.train.batch_size is not None:
        batch = user("train.batch_size")
    elif profile is None:
        batch = Choice(1, "default", "no `mlx-ltc profile` for this model and backend")
    else:  # the engine's peak grows ~linearly with batch x length
        value = max(1, min(8, profile.max_seq_len * profile.batch_size // seq_len.value))
        batch = Choice(value, "profile", budget)

    chosen = policy["policy"]
    if chosen.value == "auto":
        name, why = auto_policy(cfg, policy, backend, loaded, seq_len.value, batch.value, profile)
        p = POLICIES[name]
        chosen = Choice(name, "derived", why)
        ruled_out = policy["policy"].source == "backend"  # the engine can't run this model
        source, because = ("backend", policy["policy"].why) if ruled_out else ("derived", f"policy {name}")
        policy = policy | {k: Choice(getattr(p, k), source, because) for k in _PARTS[:3]}
    if policy["staged"].value and cfg.lora.dropout > 0:
        raise UserError("lora.dropout > 0 needs memory.staged: false (recomputation must be deterministic)")
    grad_checkpoint = cfg.train.grad_checkpoint
    if chosen.value in POLICIES:
        grad_checkpoint = POLICIES[chosen.value].checkpoint

    layers = user("memory.layers_per_stage")
    if not policy["staged"].value:
        layers = Choice(0, layers.source, "not staged")
    elif not layers.value:
        if profile is not None and seq_len.value * batch.value >= profile.max_seq_len:
            layers = Choice(profile.layers_per_stage, "profile", budget)
        elif chosen.value in POLICIES:
            p = POLICIES[chosen.value]
            layers = Choice(p.layers_per_stage(_layers(loaded)), "derived", f"policy {p.name}")
        else:
            layers = Choice(1, "default", "every layer's input kept")

    resolved = config.merge(
        cfg,
        {
            "data": {"seq_len": seq_len.value},
            "train": {"batch_size": batch.value, "grad_checkpoint": grad_checkpoint},
            "lora": {"rank": rank.value},
            "curriculum": {"phases": phases.value},
            "memory": {k: c.value for k, c in policy.items() if k != "policy"}
            | {"policy": chosen.value, "layers_per_stage": layers.value},
        },
    )
    return RunPlan(backend_choice, seq_len, batch, rank, phases, policy["attention"], policy["loss"],
                   policy["staged"], layers, resolved, chosen)  # fmt: skip


def _layers(loaded) -> int:
    config = getattr(loaded, "config", {}) or {}
    return int(config.get("num_hidden_layers") or len(getattr(getattr(loaded, "model", None), "layers", [None])))
