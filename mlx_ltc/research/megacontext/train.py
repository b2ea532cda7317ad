"""Training the gist encoders: GistNet on substitutability against the frozen base
(`objective.substitution_loss`); the base-LoRA encoder on autoencoding, then autoencoding + continuation +
contrast, with the decoder's reading LoRA (when it has one) trained jointly."""

import math
import time
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_ltc.research.megacontext.gistnet import GistNet
from mlx_ltc.research.megacontext.encoder import LoraEncoder
from mlx_ltc.research.megacontext.objective import autoencoding, continuation, substitution_loss, teacher_logprobs
from mlx_ltc.train.lora import adapters_off

__all__ = ["EncoderWeights", "encoder_loss", "sample_windows", "train_encoder", "train_gistnet"]


def sample_windows(files: list, length: int, batch: int, rng) -> mx.array:
    """(batch, length) windows at random places of random files long enough to hold one."""
    long_enough = [f for f in files if len(f) >= length]
    if not long_enough:
        raise ValueError(f"no training file holds {length} tokens")
    picks = rng.integers(0, len(long_enough), batch)
    rows = []
    for i in picks:
        start = rng.integers(0, len(long_enough[i]) - length + 1)
        rows.append(long_enough[i][start : start + length])
    return mx.array(np.stack(rows).astype(np.int32))


def _schedule(lr: float, steps: int):
    warmup = max(1, steps // 10)
    return lambda i: lr * min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))


def train_gistnet(
    net: GistNet, model, files: list, steps: int, blocks: int = 8, keep: int = 2, horizon: int = 64,
    batch: int = 2, lr: float = 1e-3, max_grad_norm: float = 1.0, seed: int = 0, contrast: float = 0.0,
    level: int = 1, log=None,
) -> list:  # fmt: skip
    """AdamW with warmup + cosine on windows of `blocks` blocks + `horizon` tokens; returns one record per step
    (loss, KL, extra NLL, contrast gap, grad norm, seconds)."""
    rng = np.random.default_rng(seed)
    schedule = _schedule(lr, steps)
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.0)

    def loss_fn(net, tokens, teacher):
        return substitution_loss(net, model, tokens, teacher, keep, contrast=contrast, level=level)

    step = nn.value_and_grad(net, loss_fn)
    length = blocks * net.config.block + horizon
    records = []
    for i in range(steps):
        began = time.perf_counter()
        tokens = sample_windows(files, length, batch, rng)
        (loss, kl, extra, gap), grads = step(net, tokens, teacher_logprobs(model, tokens, horizon))
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        opt.learning_rate = schedule(i)
        opt.update(net, grads)
        mx.eval(net.parameters(), opt.state, loss, kl, extra, gap)
        seconds = time.perf_counter() - began
        records.append({"step": i + 1, "loss": loss.item(), "kl": kl.item(), "extra_nll": extra.item(),
                        "contrast_gap": gap.item(), "grad_norm": norm.item(), "lr": schedule(i),
                        "seconds": seconds})  # fmt: skip
        if log:
            log(records[-1])
    return records


class EncoderWeights(NamedTuple):
    autoencode: float = 1.0
    continuation: float = 1.0  # KL + extra NLL at the horizon
    contrast: float = 1.0  # own-vs-next-sample's-gists hinge


DEFAULT_WEIGHTS = EncoderWeights()


class _Joint(nn.Module):
    """What one optimizer trains: the encoder, and the decoder's reading LoRA if it has one."""

    def __init__(self, encoder: LoraEncoder, reader):
        super().__init__()
        self.encoder = encoder
        self.reader = reader


def encoder_loss(joint: _Joint, tokens: mx.array, teacher, keep: int, weights: EncoderWeights, block: int = 32,
                 margin: float = 0.05) -> tuple:  # fmt: skip
    """(loss, parts) over windows tokens (B, blocks * block + horizon): the first `blocks - keep` blocks are
    gisted (L1); autoencoding rebuilds each of them from its gists; with teacher log-probs (None: autoencoding
    only) the continuation terms score the horizon with the gists in place of the blocks."""
    encoder, reader = joint.encoder, joint.reader
    batch, n = tokens.shape
    horizon = 0 if teacher is None else teacher.shape[1]
    gisted = n // block if teacher is None else (n - horizon) // block - keep
    raw = reader.model.embed_tokens(tokens).astype(mx.float32)
    width = raw.shape[-1]
    blocks = tokens[:, : gisted * block].reshape(batch * gisted, block)
    gists = encoder(raw[:, : gisted * block].reshape(batch * gisted, block, width), 1)
    ae_nll, ae_acc = autoencoding(reader, gists, blocks, encoder.marker)
    loss = weights.autoencode * ae_nll
    parts = {"ae_nll": ae_nll, "ae_acc": ae_acc}
    if teacher is not None:
        per_sample = gists.reshape(batch, gisted, gists.shape[1], width)
        kl, extra, gap, hinge = continuation(reader, per_sample, raw, tokens, teacher, block, weights.contrast, margin)
        loss = loss + weights.continuation * (kl + extra) + weights.contrast * hinge
        parts |= {"kl": kl, "extra_nll": extra, "contrast_gap": gap}
    return loss, parts


def train_encoder(
    encoder: LoraEncoder, reader, files: list, steps: int, autoencode_steps: int, blocks: int = 8, keep: int = 2,
    horizon: int = 64, batch: int = 2, lr: float = 3e-4, weights: EncoderWeights = DEFAULT_WEIGHTS,
    max_grad_norm: float = 1.0, seed: int = 0, log=None,
) -> list:  # fmt: skip
    """AdamW (warmup + cosine) on windows of `blocks` blocks + `horizon` tokens: the first `autoencode_steps`
    updates on autoencoding alone (the gists learn to hold their block before they are asked to stand in for
    it), the rest on all three terms. The reader's trainable parameters (its reading LoRA) train along; the
    teacher is the reader with its adapters off, i.e. the frozen base. One record per update."""
    rng = np.random.default_rng(seed)
    schedule = _schedule(lr, steps)
    opt = optim.AdamW(learning_rate=lr, weight_decay=0.0)
    joint = _Joint(encoder, reader)

    def loss_fn(joint, tokens, teacher):
        return encoder_loss(joint, tokens, teacher, keep, weights)

    step = nn.value_and_grad(joint, loss_fn)
    length = blocks * 32 + horizon
    records = []
    for i in range(steps):
        began = time.perf_counter()
        tokens = sample_windows(files, length, batch, rng)
        teacher = None
        if i >= autoencode_steps:
            with adapters_off(reader):
                teacher = teacher_logprobs(reader, tokens, horizon)
        else:
            tokens = tokens[:, : (blocks - keep) * 32]  # autoencoding reads only the gisted blocks
        (loss, parts), grads = step(joint, tokens, teacher)
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        opt.learning_rate = schedule(i)
        opt.update(joint, grads)
        mx.eval(joint.trainable_parameters(), opt.state, loss, parts)
        seconds = time.perf_counter() - began
        records.append({"step": i + 1, "loss": loss.item(), **{k: v.item() for k, v in parts.items()},
                        "grad_norm": norm.item(), "lr": schedule(i), "seconds": seconds})  # fmt: skip
        if log:
            log(records[-1])
    return records
