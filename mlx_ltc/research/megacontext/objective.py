"""The gist encoders' training signals against the base: substitutability (continuation) and autoencoding.

A sample is `blocks` raw 32-token blocks followed by `horizon` tokens. The teacher is the base on all of it,
raw. The student sees the first `blocks - keep` blocks replaced by their L1 gists (at their span centres),
the last `keep` blocks raw, then the horizon. The loss is KL(teacher || student) of the next-token
distributions plus the student's extra NLL, both only at the horizon's real next-token targets: never at
gist slots or inside the raw blocks.

Autoencoding asks the decoder to rebuild a block from its gists alone (ICAE's pretraining task): a direct
test, and a direct training signal, that the gists hold the block's content.
"""

import mlx.core as mx
import numpy as np

from mlx_ltc.research.megacontext.gistnet import GistNet
from mlx_ltc.research.megacontext.positions import forward_at
from mlx_ltc.numerics.loss import token_nll
from mlx_ltc.numerics.reductions import logsumexp

__all__ = ["autoencoding", "continuation", "rebuild", "substitution_loss", "teacher_logprobs"]


def _log_softmax(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - logsumexp(logits)[..., None]  # blockwise: MLX's CPU logsumexp drifts on 49K-wide rows


def teacher_logprobs(model, tokens: mx.array, horizon: int) -> mx.array:
    """(B, horizon, V) log-probabilities of the base on the raw samples (B, n), predicting the last
    `horizon` tokens; no gradient."""
    logits = model(tokens[:, :-1])[:, -horizon:]
    return mx.stop_gradient(_log_softmax(logits))


def _student(model, gists: mx.array, raw: mx.array, span: int, horizon: int) -> mx.array:
    """Log-probs of the horizon's targets' distributions with `gists` (B, g, slots, d) in place of the first g
    spans of `span` tokens each; a span's slots sit evenly inside it (one slot: at its centre)."""
    batch, g, slots, width = gists.shape
    gisted, n = g * span, raw.shape[1]
    student_in = mx.concatenate([gists.reshape(batch, g * slots, width), raw[:, gisted:-1]], axis=1)
    within = (np.arange(slots) + 0.5) * span / slots - 0.5
    centres = (np.arange(g)[:, None] * span + within[None]).reshape(-1)
    positions = np.concatenate([centres, np.arange(gisted, n - 1)]).astype(np.float32)
    dtype = model.model.embed_tokens.weight.dtype
    return _log_softmax(forward_at(model, student_in.astype(dtype), mx.array(positions))[:, -horizon:])


def continuation(model, gists: mx.array, raw: mx.array, tokens: mx.array, teacher: mx.array, span: int,
                 contrast: float = 0.0, margin: float = 0.05) -> tuple:  # fmt: skip
    """(KL, extra NLL, contrast gap, hinge) of the horizon with `gists` (B, g, slots, d) in place of the first g
    spans of the raw embeddings (B, n, d); the gap is NLL(with the next sample's gists) - NLL(own), the hinge
    max(0, margin - gap) (zero when contrast is 0 or there is one sample)."""
    horizon = teacher.shape[1]
    student = _student(model, gists, raw, span, horizon)
    kl = (mx.exp(teacher) * (teacher - student)).sum(axis=-1).mean()
    targets = tokens[:, -horizon:, None]
    extra = (mx.take_along_axis(teacher - student, targets, axis=-1)).mean()  # student NLL - teacher NLL
    gap = hinge = mx.array(0.0)
    if contrast and gists.shape[1] and gists.shape[0] > 1:
        swapped = _student(model, mx.roll(gists, 1, axis=0), raw, span, horizon)
        gap = mx.take_along_axis(student - swapped, targets, axis=-1).mean()  # NLL(swapped) - NLL(own)
        hinge = mx.maximum(margin - gap, 0.0)
    return kl, extra, gap, hinge


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
    kl, extra, gap, hinge = continuation(model, gists[:, :, None], raw, tokens, teacher, block**level, contrast, margin)
    return kl + nll_weight * extra + contrast * hinge, kl, extra, gap


def rebuild(model, gists: mx.array, blocks: mx.array, marker: mx.array) -> tuple:
    """(NLL, hits), each (N, block): the decoder rebuilding each block from its gists. It reads
    [gists (N, slots, d), marker, block[:-1]] at positions 0, 1, ... and predicts blocks (N, block) token by
    token (teacher forcing; a hit is an argmax equal to the token). slots may be 0 (the marker alone: what the
    decoder guesses without any gist)."""
    n, slots, width = gists.shape
    embed = model.model.embed_tokens
    inputs = mx.concatenate([gists.astype(mx.float32), mx.broadcast_to(marker.astype(mx.float32), (n, 1, width)),
                             embed(blocks[:, :-1]).astype(mx.float32)], axis=1)  # fmt: skip
    logits = model(None, input_embeddings=inputs.astype(embed.weight.dtype))[:, slots:].astype(mx.float32)
    return token_nll(logits, blocks), logits.argmax(axis=-1) == blocks


def autoencoding(model, gists: mx.array, blocks: mx.array, marker: mx.array) -> tuple:
    """(mean NLL, token accuracy) of `rebuild`: the autoencoding objective and its direct measure."""
    nll, hits = rebuild(model, gists, blocks, marker)
    return nll.mean(), hits.astype(mx.float32).mean()
