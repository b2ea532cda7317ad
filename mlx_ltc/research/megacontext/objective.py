"""GistNet's training signal: substitutability against the frozen base.

A sample is `blocks` raw 32-token blocks followed by `horizon` tokens. The teacher is the base on all of it,
raw. The student sees the first `blocks - keep` blocks replaced by their L1 gists (at their span centres),
the last `keep` blocks raw, then the horizon. The loss is KL(teacher || student) of the next-token
distributions plus the student's extra NLL, both only at the horizon's real next-token targets: never at
gist slots or inside the raw blocks.
"""

import mlx.core as mx
import numpy as np

from mlx_ltc.research.megacontext.gistnet import GistNet
from mlx_ltc.research.megacontext.positions import forward_at
from mlx_ltc.numerics.reductions import logsumexp

__all__ = ["substitution_loss", "teacher_logprobs"]


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - logsumexp(logits)[..., None]  # blockwise: MLX's CPU logsumexp drifts on 49K-wide rows


def teacher_logprobs(model, tokens: mx.array, horizon: int) -> mx.array:
    """(B, horizon, V) log-probabilities of the base on the raw samples (B, n), predicting the last
    `horizon` tokens; no gradient."""
    logits = model(tokens[:, :-1])[:, -horizon:]
    return mx.stop_gradient(_log_softmax(logits))


def _student(model, gists: mx.array, raw: mx.array, span: int, horizon: int) -> mx.array:
    """Log-probs of the horizon's targets' distributions with `gists` (B, g, d) in place of the first g spans of
    `span` tokens each."""
    gisted, n = gists.shape[1] * span, raw.shape[1]
    student_in = mx.concatenate([gists, raw[:, gisted:-1]], axis=1)
    centres = np.arange(gists.shape[1]) * span + (span - 1) / 2
    positions = np.concatenate([centres, np.arange(gisted, n - 1)]).astype(np.float32)
    dtype = model.model.embed_tokens.weight.dtype
    return _log_softmax(forward_at(model, student_in.astype(dtype), mx.array(positions))[:, -horizon:])


def substitution_loss(net: GistNet, model, tokens: mx.array, teacher: mx.array, keep: int, nll_weight: float = 1.0,
                      block: int = 32, contrast: float = 0.0, margin: float = 0.05,
                      level: int = 1) -> tuple:  # fmt: skip
    """(loss, KL, extra NLL, contrast gap) over samples tokens (B, blocks * block + horizon) with teacher
    log-probs. contrast > 0 adds contrast * max(0, margin - (NLL with the next sample's gists - NLL with own)).
    level 2: the gisted blocks (a multiple of `block`) become L2 gists of GistNet's L1 gists."""
    batch, n = tokens.shape
    horizon = teacher.shape[1]
    gisted = (n - horizon) // block - keep
    raw = model.model.embed_tokens(tokens).astype(mx.float32)
    width = raw.shape[-1]
    gists = mx.zeros((batch, 0, width))
    if gisted:
        gists = net(raw[:, : gisted * block].reshape(batch * gisted, block, width), 1).reshape(batch, gisted, width)
    if level == 2:
        if gisted % block:
            raise ValueError(f"L2 gists need a multiple of {block} gisted blocks, not {gisted}")
        gists = net(gists.reshape(-1, block, width), 2).reshape(batch, gisted // block, width)
    student = _student(model, gists, raw, block**level, horizon)
    kl = (mx.exp(teacher) * (teacher - student)).sum(axis=-1).mean()
    targets = tokens[:, -horizon:, None]
    extra = (mx.take_along_axis(teacher - student, targets, axis=-1)).mean()  # student NLL - teacher NLL
    loss, gap = kl + nll_weight * extra, mx.array(0.0)
    if contrast and gisted and batch > 1:
        swapped = _student(model, mx.roll(gists, 1, axis=0), raw, block**level, horizon)
        gap = mx.take_along_axis(student - swapped, targets, axis=-1).mean()  # NLL(swapped) - NLL(own)
        loss = loss + contrast * mx.maximum(margin - gap, 0.0)
    return loss, kl, extra, gap
