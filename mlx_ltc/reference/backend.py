"""`--backend torch`: the train pipeline on torch CPU, for small models.

The same dataset, batches (order included), LoRA layers and names, loss weights, schedule, clipping
and report as the MLX backend; the model is transformers' own class with the same weights
(`reference.model`), the optimizer torch.optim.AdamW. No memory engine: plain autograd, so this is
for models and lengths that fit as they are. Adapters are written in mlx-lm's format.
"""

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from mlx_ltc import atomic
from mlx_ltc.errors import UserError
from mlx_ltc.train.result import TrainResult
from mlx_ltc.reference import lora, ops, optim
from mlx_ltc.reference import model as reference_model


class TorchBackend:
    name = "torch"
    curriculum = False  # one phase at the dataset's length
    memory_engine = False  # plain autograd: the model and length must fit as they are

    def load(self, model_dir, cfg, log):
        from mlx_ltc import models

        log("backend: torch (transformers' model classes on CPU, float32; no memory engine)")
        model = reference_model.load(model_dir, torch.float32)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return models.LoadedModel(
            model=model,
            tokenizer=models.load_tokenizer(model_dir),
            model_dir=Path(model_dir),
            config=config,
            dequantized=True,
            dtype="float32",
            fixes=[],
        )

    def engine_supports(self, loaded):
        return False

    def prepare(self, loaded, cfg):
        pass

    def perplexity(self, model, split, batch_size, desc, progress):
        import torch.nn.functional as F
        from mlx_ltc import progress as progress_bars

        from mlx_ltc.eval import Tally

        if len(split) == 0:
            raise UserError(f"{desc}: the split is empty")
        model.eval()
        tally, kinds = Tally(), split.kinds()
        starts = range(0, len(split), batch_size)
        with torch.no_grad():
            for s in progress_bars.bar(starts, desc=desc, unit="batch", enabled=progress, leave=False):
                tokens = torch.from_numpy(split.tokens[s : s + batch_size]).long()
                logits = model(input_ids=tokens[:, :-1]).logits
                nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
                tally.add(nll.double().numpy(), kinds[s : s + batch_size])
        return tally.result()

    def apply_lora(self, model, cfg):
        c = cfg.lora
        rank = c.rank  # resolved by the run's plan
        names = lora.apply(model, c.targets, rank, c.scale, c.layers, c.dropout, seed=cfg.train.seed)
        if not names:
            raise UserError(f"lora.targets {c.targets} match no linear layer of this model")
        blocks = len(model.model.layers)
        keys = sorted({n.split(".", 3)[3] for n in names})
        return {
            "fine_tune_type": "lora",
            "num_layers": blocks if c.layers < 0 else min(c.layers, blocks),
            "lora_parameters": {"rank": rank, "scale": c.scale, "dropout": c.dropout, "keys": keys},
        }

    @contextmanager
    def adapters_off(self, model):
        """The base model's numbers from the adapted one: every LoRA layer (`reference.lora.LoRALinear`,
        y = W x + b + scale * (x A) B) with scale 0 adds exactly zero to its frozen layer's output."""
        layers = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
        scales = [m.scale for m in layers]
        for m in layers:
            m.scale = 0.0
        try:
            yield
        finally:
            for m, scale in zip(layers, scales):
                m.scale = scale

    def train(self, model, split, val, cfg, run_dir, progress, resume=False, max_steps=None, world=None):
        """The plain loop: one phase at the dataset's length, no orchestrator or checkpoints."""
        from mlx_ltc.train import phases
        from mlx_ltc.train.batches import endless_indices

        t = cfg.train
        if resume:
            raise UserError("--resume needs the mlx backend: the torch reference writes no checkpoints")
        if len(split) == 0:
            raise UserError("the training split is empty")
        batch_size, steps = t.batch_size, phases.total_steps(cfg, len(split))  # the plan set the batch
        params = list(lora.adapter_state(model).values())
        for p in params:
            p.requires_grad_(True)
        opt = optim.adamw(params, t.weight_decay)
        stream = endless_indices(len(split), batch_size, t.seed)
        torch.manual_seed(t.seed)  # LoRA dropout
        model.train()
        with StepLog(Path(run_dir) / "metrics.jsonl", steps, progress, _peak_rss_gb) as log:
            for step in range(1, steps + 1):
                opt.zero_grad()
                micro = [next(stream) for _ in range(t.grad_accum)]
                weight = sum(float(split.weights[idx].sum()) for idx in micro)
                total = 0.0
                for idx in micro:  # token-weighted: the mean over all micro-batches' targets
                    nll, _ = ops.next_token_nll(
                        model, torch.from_numpy(split.tokens[idx]).long(), torch.from_numpy(split.weights[idx])
                    )
                    (nll / weight).backward()
                    total += nll.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item()
                lr = optim.lr_at(step - 1, t.lr, t.warmup_steps, t.min_lr_ratio, steps)
                optim.set_lr(opt, lr)
                opt.step()
                log.step(step, total / weight, lr, grad_norm, sum(int(split.real[idx].sum()) for idx in micro))
        return log.result(sum(p.numel() for p in params))

    def save_adapters(self, model, adapter_dir, adapter_config):
        from safetensors.torch import save_file

        adapter_dir = Path(adapter_dir)
        weights = {n: p.detach().float().contiguous() for n, p in lora.adapter_state(model).items()}
        with atomic.atomic_path(adapter_dir / "adapters.safetensors") as tmp:
            save_file(weights, str(tmp))
        atomic.write_json(adapter_dir / "adapter_config.json", adapter_config)


def _peak_rss_gb() -> float:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9


class StepLog:
    """What every backend records per optimizer step: a `metrics.jsonl` line, the progress bar (log lines
    without a terminal), and the divergence check; `result` is the run's TrainResult."""

    def __init__(self, path: Path, steps: int, progress: bool, peak_memory_gb):
        from mlx_ltc import progress as progress_bars

        self.path, self.steps, self.peak = Path(path), steps, peak_memory_gb
        self.bar = progress_bars.bar(total=steps, desc="train", unit="step", enabled=progress)
        self.tokens, self.loss, self.start = 0, float("nan"), time.perf_counter()

    def __enter__(self):
        self.file = open(self.path, "w", encoding="utf-8")
        return self

    def __exit__(self, *exc):
        self.file.close()
        self.bar.close()

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int) -> None:
        if not math.isfinite(loss):
            raise UserError(f"training diverged at step {step}: loss is {loss}; lower train.lr")
        self.tokens += tokens
        self.loss = loss
        elapsed = time.perf_counter() - self.start
        row = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / elapsed,
            "peak_memory_gb": self.peak(),
            "elapsed_s": elapsed,
        }
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.bar.set_postfix(
            loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['peak_memory_gb']:.2f}GB", refresh=False
        )
        self.bar.update(1)

    def result(self, trainable_params: int) -> TrainResult:
        wall = time.perf_counter() - self.start
        return TrainResult(
            steps=self.steps,
            tokens=self.tokens,
            wall_s=wall,
            tokens_per_s=self.tokens / wall,
            peak_memory_gb=self.peak(),
            final_loss=self.loss,
            trainable_params=trainable_params,
        )
