"""Weighted next-token loss: padding never contributes; documents can weigh more or less.

`targets` below is either lengths (B,) — row b real for its first lengths[b] tokens — or per-target
weights (B, T-1), the loss weight of each next-token target (0 = ignored).

`chunked_nll` never materialises the (L x V) logits: positions go through the LM head in chunks,
forward and backward (a custom VJP recomputes each chunk's logits), one chunk alive at a time.
"""

import mlx.core as mx

from mlx_ltc.numerics.reductions import logsumexp

__all__ = ["chunked_nll", "head_of", "next_token_targets", "nll_sum", "nll_sum_chunked", "token_nll"]


def next_token_targets(tokens: mx.array, lengths: mx.array):
    """(inputs, targets, weights) from lengths (B,) or target weights (B, T-1)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if lengths.ndim == 2:
        return inputs, targets, lengths.astype(mx.float32)
    weights = (mx.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)).astype(mx.float32)
    return inputs, targets, weights


def head_of(model):
    """The LM head as a function of final hidden states (untied lm_head, or the tied embedding)."""
    return model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear


def token_nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Cross-entropy per position, (..., V) fp32 logits -> (...): logsumexp minus the target's logit."""
    picked = mx.take_along_axis(logits, mx.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return logsumexp(logits) - picked


def nll_sum(model, tokens: mx.array, lengths: mx.array):
    """Weighted sum of next-token NLL and the summed weight (full logits: the stock path).

    tokens: (B, T) int32, predicting tokens[:, 1:]; lengths: (B,) or (B, T-1) weights (see above).
    """
    inputs, targets, weights = next_token_targets(tokens, lengths)
    logits = model(inputs).astype(mx.float32)
    return (token_nll(logits, targets) * weights).sum(), weights.sum()


def nll_sum_chunked(model, tokens: mx.array, lengths: mx.array, chunk: int = 512):
    inputs, targets, weights = next_token_targets(tokens, lengths)
    return chunked_nll(model.model(inputs), head_of(model), targets, weights, chunk), weights.sum()


def _spans(length: int, chunk: int):
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def chunked_nll(hidden: mx.array, head, targets: mx.array, weights: mx.array, chunk: int = 512) -> mx.array:
    """sum over positions of weights * NLL(targets | head(hidden)); zero weight = ignored position.

    hidden (B, T, d) final (normed) hidden states; head maps (B, n, d) -> (B, n, V) and is frozen:
    gradients flow to `hidden` only. Each chunk depends on the previous one (mx.depends) so MLX
    evaluates the chunks one after another instead of keeping all their logits alive.
    """
    spans = _spans(hidden.shape[1], chunk)
    targets = mx.maximum(targets, 0)

    def logits_of(h):
        return head(h).astype(mx.float32)

    @mx.custom_function
    def nll(hidden):
        total = mx.array(0.0)
        for s, e in spans:
            logits = logits_of(mx.depends(hidden[:, s:e], total))
            total = total + (token_nll(logits, targets[:, s:e]) * weights[:, s:e]).sum()
        return total

    @nll.vjp
    def nll_vjp(primals, cotangent, output):
        hidden = primals[0] if isinstance(primals, (list, tuple)) else primals
        grads = []
        for s, e in spans:
            h = hidden[:, s:e] if not grads else mx.depends(hidden[:, s:e], grads[-1])
            logits = logits_of(h)
            one_hot = mx.arange(logits.shape[-1]) == targets[:, s:e, None]
            probs = mx.exp(logits - logsumexp(logits)[..., None])
            d_logits = (probs - one_hot) * (weights[:, s:e, None] * cotangent)
            grads.append(mx.vjp(head, [h], [d_logits.astype(h.dtype)])[1][0])
        return mx.concatenate(grads, axis=1)

    return nll(hidden)
