"""The seam between `train` and the array library that computes it, drawn where the torch reference
really goes: `run.run_train` talks to a Backend only (load a model, say what its memory engine and
curriculum can do, measure validation perplexity, add LoRA, switch it off, train, save adapters). `mlx` is the
product; `torch` (mlx_ltc.reference.backend) is the independent reference, so the training pipeline
can run, and its loss curves be compared, without MLX doing the numbers.

What measures MLX itself stays on MLX and off the seam: `eval` (completion, streaming, the adapters of
either backend read by mlx-lm), `profile` (MLX's peak memory) and `compare` (MLX against torch, op by
op). A torch run's report says which of the final measures it leaves out, and its plan says it has no
curriculum and no memory engine instead of deriving them.
"""

from pathlib import Path
from typing import Protocol

from mlx_ltc.config import Config
from mlx_ltc.errors import UserError

NAMES = ("mlx", "torch")


class Backend(Protocol):
    name: str
    curriculum: bool  # trains in phases of growing length, steered by the orchestrator
    memory_engine: bool  # runs the memory engine (O(L) attention, chunked loss, staged execution)

    def load(self, model_dir: Path, cfg: Config, log): ...  # -> models.LoadedModel

    def engine_supports(self, loaded) -> bool: ...  # the memory engine can run this model

    def prepare(self, loaded, cfg: Config) -> None: ...  # install the resolved config's memory policy

    def perplexity(self, model, split, batch_size: int, desc: str, progress: bool): ...  # -> eval.Perplexity

    def apply_lora(self, model, cfg: Config) -> dict: ...  # -> mlx-lm adapter_config

    # a context manager: inside it the adapted model computes the base model's numbers (every LoRA term
    # off), so the base eval runs after training on the model that trained
    def adapters_off(self, model): ...

    # -> TrainResult; writes run_dir/metrics.jsonl. resume: continue from run_dir's checkpoints. world: the
    # ranks of an mlx.launch run (distributed.World), or None for one process
    def train(
        self, model, split, val, cfg: Config, run_dir: Path, progress: bool, resume=False, max_steps=None, world=None
    ): ...

    def save_adapters(self, model, adapter_dir: Path, adapter_config: dict) -> None: ...


class MLXBackend:
    name = "mlx"
    curriculum = True
    memory_engine = True

    def load(self, model_dir, cfg, log):
        from mlx_ltc import models

        return models.load(model_dir, cfg.model.dequantize)

    def engine_supports(self, loaded):
        from mlx_ltc.train import engine

        return engine.supports(loaded.model)

    def prepare(self, loaded, cfg):
        from mlx_ltc.train import engine

        if cfg.memory.attention == "efficient":  # base and adapted evals then use the training attention
            engine.use_efficient_attention(loaded.model, cfg.memory.block_mb << 20)

    def perplexity(self, model, split, batch_size, desc, progress):
        from mlx_ltc.eval import perplexity

        return perplexity(model, split, batch_size, desc=desc, progress=progress)

    def apply_lora(self, model, cfg):
        from mlx_ltc.train.lora import apply_lora

        return apply_lora(model, cfg.lora, seed=cfg.train.seed)

    def adapters_off(self, model):
        from mlx_ltc.train.lora import adapters_off

        return adapters_off(model)

    def train(self, model, split, val, cfg, run_dir, progress, resume=False, max_steps=None, world=None):
        from mlx_ltc.train import phases
        from mlx_ltc.train.trainer import Trainer

        trainer = Trainer(model, split, val, cfg, run_dir, progress=progress, world=world)
        if resume:
            trainer.resume(max_steps)
        else:
            trainer.start(phases.total_steps(cfg, len(split)))
        return trainer.run()

    def save_adapters(self, model, adapter_dir, adapter_config):
        from mlx_ltc.train.lora import save_adapters

        save_adapters(model, adapter_dir, adapter_config)


def get(name: str) -> Backend:
    if name == "mlx":
        return MLXBackend()
    if name == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UserError(
                "--backend torch needs PyTorch: pip install 'mlx-ltc[reference]' (or scripts/setup.sh --dev)"
            ) from None
        from mlx_ltc.reference.backend import TorchBackend

        return TorchBackend()
    raise UserError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
