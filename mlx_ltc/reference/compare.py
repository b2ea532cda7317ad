"""`mlx-ltc compare`: from identical weights, LoRA initialisation and batches, run forward, loss,
LoRA gradients and N optimizer steps in MLX (the code `train` runs, memory engine included) and in
torch (`mlx_ltc.reference`), and measure every quantity's deviation against `TOLERANCES`."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlx_ltc import tables
from mlx_ltc.errors import UserError
from mlx_ltc.reference import TOLERANCES, deviation


@dataclass
class Row:
    quantity: str
    tolerance: str  # key of TOLERANCES
    abs: float
    rel: float

    @property
    def ok(self) -> bool:
        t = TOLERANCES[self.tolerance]
        return self.abs <= t.abs or self.rel <= t.rel


@dataclass
class Comparison:
    model: str
    steps: int
    seq_len: int
    batch_size: int
    reference_dtype: str
    rows: list = field(default_factory=list)
    curve: list = field(default_factory=list)  # [step, mlx loss, torch loss, mlx lr, torch lr]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def add(self, quantity, tolerance, ours, ref):
        d, r = deviation(ours, ref)
        self.rows.append(Row(quantity, tolerance, d, r))

    def table(self) -> str:
        rows = [
            [r.quantity, f"{r.abs:.2e}", f"{r.rel:.2e}", *_tolerance(r), "yes" if r.ok else "NO"] for r in self.rows
        ]
        curve = [[step, f"{a:.6f}", f"{b:.6f}", f"{abs(a - b):.2e}"] for step, a, b, _, _ in self.curve]
        failed = [r.quantity for r in self.rows if not r.ok]
        return (
            f"compare {self.model}: MLX vs torch ({self.reference_dtype}), {self.steps} steps of "
            f"{self.batch_size} x {self.seq_len} tokens\n"
            + tables.text(["quantity", "max |d|", "rel (L2)", "tol abs", "tol rel", "ok"], rows, align="lrrrrl")
            + tables.text(["step", "loss (mlx)", "loss (torch)", "|d|"], curve, align="rrrr")
            + "  result: "
            + ("all within tolerance" if not failed else "FAILED: " + ", ".join(failed))
            + "\n"
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "steps": self.steps,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "reference_dtype": self.reference_dtype,
            "ok": self.ok,
            "rows": [
                {
                    "quantity": r.quantity,
                    "abs": r.abs,
                    "rel": r.rel,
                    "tolerance": {"abs": TOLERANCES[r.tolerance].abs, "rel": TOLERANCES[r.tolerance].rel},
                    "ok": r.ok,
                }
                for r in self.rows
            ],
            "curve": [dict(zip(("step", "mlx_loss", "torch_loss", "mlx_lr", "torch_lr"), c)) for c in self.curve],
        }


def code_batches(tokenizer, source: Path, count: int, batch_size: int, seq_len: int):
    """`count` batches (tokens (B, L), target weights (B, L-1)) of real code: the source files under
    `source`, each followed by EOS, cut into windows. Documents alternate weights 1.0 and 0.5 so the
    weighting is exercised, and every row holds a different document boundary."""
    files = sorted(p for p in Path(source).rglob("*.py") if p.is_file())
    if not files:
        raise UserError(f"compare: no Python files under {source} to make batches from")
    need = count * batch_size * seq_len
    ids, weights = [], []
    for i, path in enumerate(files):
        if len(ids) >= need:  # enough text: don't tokenize a whole large repository
            break
        doc = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        doc.append(tokenizer.eos_token_id)
        ids.extend(doc)
        weights.extend([1.0 if i % 2 == 0 else 0.5] * len(doc))
    reps = math.ceil(need / len(ids))
    ids, weights = np.array(ids * reps)[:need], np.array(weights * reps, dtype=np.float32)[:need]
    tokens = ids.reshape(count, batch_size, seq_len).astype(np.int32)
    w = weights.reshape(count, batch_size, seq_len)[..., 1:]  # the weight of the token each target predicts
    return list(zip(tokens, w))


def run(
    model_name: str,
    steps: int,
    seq_len: int,
    batch_size: int = 2,
    source: Path | None = None,
    cache_dir: Path | None = None,
    memory=None,
    reference_dtype: str = "float32",
    log=lambda msg: None,
) -> Comparison:
    import mlx.core as mx
    import torch
    from mlx.utils import tree_flatten

    from mlx_ltc import models
    from mlx_ltc.train import engine
    from mlx_ltc.train.lora import apply_lora
    from mlx_ltc.train.update import Updater
    from mlx_ltc.train import phases
    from mlx_ltc.config import LoraConfig, MemoryConfig, TrainConfig
    from mlx_ltc.reference import lora as rlora
    from mlx_ltc.reference import model as rmodel
    from mlx_ltc.reference import ops, optim

    if steps < 1 or seq_len < 2 or batch_size < 1:
        raise UserError("compare: --steps and --batch-size must be at least 1, --seq-len at least 2")
    dtype = {"float32": torch.float32, "float64": torch.float64}[reference_dtype]
    cache_dir = Path(cache_dir) if cache_dir else models.default_cache_dir()
    model_dir = models.resolve(model_name, cache_dir)
    log(f"compare: loading {model_name} in MLX and in torch ({reference_dtype})")
    ours = models.load(model_dir)
    ref = rmodel.load(model_dir, dtype)
    lora_cfg = LoraConfig(rank=8)
    cfg = TrainConfig(max_steps=steps, lr=1e-3, warmup_steps=min(2, steps), batch_size=batch_size)
    memory = memory or MemoryConfig()
    if not engine.supports(ours.model):
        memory = MemoryConfig(attention="stock", staged=False)
    batches = code_batches(ours.tokenizer, source or Path(__file__).parents[1], steps, batch_size, seq_len)

    adapter = apply_lora(ours.model, lora_cfg, seed=0)
    names = rlora.apply(ref, lora_cfg.targets, lora_cfg.rank, lora_cfg.scale)
    mlx_lora = dict(tree_flatten(ours.model.trainable_parameters()))
    ref_lora = rlora.adapter_state(ref)
    if set(mlx_lora) != set(ref_lora):
        raise UserError(f"compare: LoRA layers differ: {sorted(set(mlx_lora) ^ set(ref_lora))[:4]}")
    assert len(names) * 2 == len(ref_lora) and adapter["lora_parameters"]["rank"] == lora_cfg.rank
    with torch.no_grad():  # identical initialisation: MLX's draw, copied
        for name, p in ref_lora.items():
            p.copy_(torch.from_numpy(np.array(mlx_lora[name])).to(dtype))
            p.requires_grad_(True)

    initial = np.concatenate([np.array(mlx_lora[n]).ravel() for n in sorted(ref_lora)])
    result = Comparison(model_name, steps, seq_len, batch_size, reference_dtype)
    update = Updater(ours.model, cfg, memory)
    schedule = phases.lr_schedule(cfg, steps)
    opt = optim.adamw(list(ref_lora.values()), cfg.weight_decay)
    tokens0 = batches[0][0]
    logits = ours.model(mx.array(tokens0[:, :-1]))
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.from_numpy(tokens0[:, :-1]).long()).logits
    result.add("logits (forward, step 0)", "logits", np.array(logits), ref_logits)
    del logits

    grads, norms, lrs = ([], []), ([], []), ([], [])
    ours.model.train()
    ref.train()
    for step, (tokens, weights) in enumerate(batches, start=1):
        stats = update([(mx.array(tokens), mx.array(weights), int((weights > 0).sum()))], schedule(step - 1))
        opt.zero_grad()
        t = torch.from_numpy(tokens).long()
        w = torch.from_numpy(weights).to(dtype)
        nll, weight = ops.next_token_nll(ref, t, w)
        (nll / weight).backward()
        ref_grads = {n: p.grad.detach().clone() for n, p in ref_lora.items()}
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref_lora.values()), cfg.max_grad_norm).item()
        ref_lr = optim.lr_at(step - 1, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio, steps)
        optim.set_lr(opt, ref_lr)
        opt.step()
        ref_loss = (nll / weight).item()
        ours_grads = dict(tree_flatten(update.last_grads))
        flat_ours = np.concatenate([np.array(ours_grads[n]).ravel() for n in sorted(ref_grads)])
        flat_ref = torch.cat([ref_grads[n].ravel() for n in sorted(ref_grads)])
        grads[0].append(flat_ours)
        grads[1].append(flat_ref.numpy())
        norms[0].append(stats.grad_norm)
        norms[1].append(ref_norm)
        lrs[0].append(stats.lr)
        lrs[1].append(ref_lr)
        result.curve.append([step, stats.loss, ref_loss, stats.lr, ref_lr])
        if step == 1:
            result.add("loss (step 1)", "loss", stats.loss, ref_loss)
        log(f"compare: step {step}/{steps} loss mlx {stats.loss:.6f} torch {ref_loss:.6f}")
    result.add("LoRA gradients (step 1)", "lora_grads", grads[0][0], grads[1][0])
    worst = max(range(steps), key=lambda i: deviation(grads[0][i], grads[1][i])[1])
    result.add(f"LoRA gradients (worst: step {worst + 1})", "lora_grads", grads[0][worst], grads[1][worst])
    result.add("gradient norm (all steps)", "grad_norm", norms[0], norms[1])
    result.add("learning rate (all steps)", "lr", lrs[0], lrs[1])
    result.add("training loss (all steps)", "loss_curve", [c[1] for c in result.curve], [c[2] for c in result.curve])
    final = dict(tree_flatten(ours.model.trainable_parameters()))
    result.add(
        f"LoRA update W_{steps} - W_0",
        "lora_update",
        np.concatenate([np.array(final[n]).ravel() for n in sorted(ref_lora)]) - initial,
        torch.cat([ref_lora[n].detach().ravel() for n in sorted(ref_lora)]).double().numpy() - initial,
    )
    return result


def _tolerance(row: Row) -> list:
    tol = TOLERANCES[row.tolerance]
    return [f"{tol.abs:.0e}", f"{tol.rel:.0e}"]
