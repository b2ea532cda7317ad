"""Loss and gradients of a long sequence with memory independent of its length, through the carried state.

The BK model is a recurrence: a chunk's outputs depend on the tokens before it only through the LayerState
it starts from (the one `BKModel.stream` carries). So a sequence is cut into chunks; a forward pass without
the head keeps just each chunk's incoming state, then the backward walks the chunks last to first,
recomputing each chunk under `mx.vjp` with two cotangents: 1 for its own loss and, for its outgoing state,
the gradient the later chunks' loss sent back. The result is the one-shot gradient (up to float32
summation order) at the cost of one extra forward without the head, with one chunk's activations alive.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ltc.research.bk.loss import tied_nll_sum
from mlx_ltc.research.bk.model import LayerState

__all__ = ["mean_nll", "nll_sum", "value_and_grad"]


def mean_nll(model, batch: mx.array) -> mx.array:
    """Mean next-token NLL of batch (B, N + 1), the whole sequence in one graph."""
    hidden, _ = model.hidden(batch[:, :-1])
    return tied_nll_sum(hidden, model.embed.weight, batch[:, 1:]) / (batch.shape[0] * (batch.shape[1] - 1))


def _spans(n: int, chunk: int) -> list:
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _flat(states: list) -> list:
    return [x for state in states for x in state]


def _unflat(arrays: list) -> list:
    return [LayerState(*arrays[i : i + 4]) for i in range(0, len(arrays), 4)]


def nll_sum(model, batch: mx.array, chunk: int) -> float:
    """Summed next-token NLL of batch (B, N + 1), evaluated chunk by chunk with the carried state."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    state, total = None, 0.0
    for s, e in _spans(inputs.shape[1], chunk or inputs.shape[1]):
        hidden, state = model.hidden(inputs[:, s:e], state)
        loss = tied_nll_sum(hidden, model.embed.weight, targets[:, s:e])
        mx.eval(loss, state)
        total += loss.item()
    return total


def value_and_grad(model, chunk: int):
    """Like `nn.value_and_grad(model, mean_nll)`: a function (model, batch) -> (mean NLL, gradients of the
    trainable parameters), computing sequences longer than `chunk` positions a chunk at a time."""
    one_shot = nn.value_and_grad(model, mean_nll)

    def run(model, batch: mx.array):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if not chunk or inputs.shape[1] <= chunk:
            return one_shot(model, batch)
        spans = _spans(inputs.shape[1], chunk)
        scale = 1.0 / (inputs.shape[0] * inputs.shape[1])

        states = [model.initial_state(inputs.shape[0])]  # the state entering each chunk
        for s, e in spans[:-1]:
            # copies: a state is the last position's slice, a view that would keep the chunk's arrays alive
            states.append(_unflat([mx.contiguous(x) for x in _flat(model.hidden(inputs[:, s:e], states[-1])[1])]))
            mx.eval(states[-1])

        names, params = map(list, zip(*tree_flatten(model.trainable_parameters())))

        def chunk_loss(s, e):
            def f(*arrays):
                model.update(tree_unflatten(list(zip(names, arrays[: len(names)]))))
                hidden, out = model.hidden(inputs[:, s:e], _unflat(arrays[len(names) :]))
                return [tied_nll_sum(hidden, model.embed.weight, targets[:, s:e]) * scale, *_flat(out)]

            return f

        total, grads = mx.array(0.0), None
        d_out = [mx.zeros_like(x) for x in _flat(states[-1])]  # nothing after the last chunk
        try:
            for (s, e), state in zip(reversed(spans), reversed(states)):
                outs, cots = mx.vjp(chunk_loss(s, e), [*params, *_flat(state)], [mx.array(1.0), *d_out])
                total = total + outs[0]
                d_params, d_out = cots[: len(names)], cots[len(names) :]
                grads = d_params if grads is None else [a + b for a, b in zip(grads, d_params)]
                mx.eval(total, grads, d_out)
        finally:
            model.update(tree_unflatten(list(zip(names, params))))
        return total, tree_unflatten(list(zip(names, grads)))

    return run
