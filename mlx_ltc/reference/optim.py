"""AdamW and the LR schedule, for the reference runs.

The optimizer is torch.optim.AdamW (decoupled weight decay, bias-corrected moments); the schedule
is written from its definition: linear warmup to lr over `warmup` updates, then cosine to
lr * min_lr_ratio at the last update.
"""

import math

import torch


def lr_at(step: int, lr: float, warmup_steps: int, min_lr_ratio: float, total_steps: int) -> float:
    """Learning rate of update number `step` (0-based)."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    decay = max(total_steps - warmup - 1, 1)
    progress = min(max((step - warmup) / decay, 0.0), 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=0.0, betas=betas, eps=eps, weight_decay=weight_decay)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
