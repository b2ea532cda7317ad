"""The long-context memory engine: what one training step keeps alive, and when MLX evaluates it.

Three parts, each switchable (config section `memory`):
- efficient attention: mlx-lm's attention modules keep their weights and LoRA layers, but their
  softmax attention is `attention.efficient_attention` (O(L) memory, custom backward);
- chunked loss: the LM head and cross-entropy run over chunks of positions (`loss.chunked_nll`);
- staged execution: instead of one lazy graph for the whole step (where MLX's scheduler keeps
  whatever it likes alive), the step runs in stages with an `mx.eval` at each boundary:
    1. forward layer by layer, keeping a checkpoint (the layer input) every k layers;
    2. loss gradient w.r.t. the final hidden states, in chunks;
    3. backward stage by stage: recompute the stage's layer inputs from its checkpoint, then each
       layer backward as attention half + MLP half, the MLP half in chunks of positions.
  The peak is then weights + checkpoints + one layer's working set, linear in L.

Works on mlx-lm's llama and starcoder2 models (pre-norm blocks: attention half then MLP half).
With `memory.context_parallel` under `mlx.launch`, each rank runs these stages on its share of the
positions and attention gathers the keys (`context_parallel`).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_ltc.config import MemoryConfig
from mlx_ltc.errors import UserError
from mlx_ltc.models import patch
from mlx_ltc.numerics.attention import efficient_attention
from mlx_ltc.numerics.loss import chunked_nll, head_of, next_token_targets, nll_sum, nll_sum_chunked, token_nll
from mlx_ltc.train import context_parallel

__all__ = ["SUPPORTED", "StagedStep", "loss_and_grad", "stages", "use_efficient_attention"]

SUPPORTED = ("llama", "starcoder2")


def supports(model) -> bool:
    return getattr(model, "model_type", None) in SUPPORTED and getattr(model.model, "swa_idx", None) is None


def check_supported(model) -> None:
    kind = getattr(model, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(
            f"the memory engine supports {', '.join(SUPPORTED)} models, not {kind!r}; "
            "set memory.attention: stock and memory.staged: false to train it with stock MLX"
        )
    if getattr(model.model, "swa_idx", None) is not None:
        raise UserError("sliding-window attention layers are not supported by the memory engine yet")


def _project(attn, x):
    """q, k, v in (B, H, L, D) with RoPE applied, exactly as mlx-lm's attention modules do."""
    B, L, _ = x.shape
    q = attn.q_proj(x).reshape(B, L, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    return attn.rope(q), attn.rope(k), v


def _attend(attn, x, block_bytes, saved=None):
    """Attention output (before the residual) and the (output, lse) to reuse in a recomputation."""
    B, L, _ = x.shape
    q, k, v = _project(attn, x)
    window = patch.attribute(attn, "window")  # models.faithful's sliding window
    o, lse = efficient_attention(q, k, v, attn.scale, block_bytes, saved=saved, window=window)
    return attn.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1)), (o, lse)


def use_efficient_attention(model, block_bytes: int) -> None:
    """Route each layer's full-sequence causal attention through `efficient_attention`.

    A per-instance patch (`models.patch`), so parameter paths (adapter names) are unchanged; calls with
    a KV cache or an explicit mask array (generation, sliding windows) keep mlx-lm's own path.
    """
    check_supported(model)

    def call(self, base_call, x, mask=None, cache=None):
        if cache is not None or not (mask is None or isinstance(mask, str)):
            return base_call(self, x, mask, cache)
        return _attend(self, x, block_bytes)[0]

    for layer in model.layers:
        patch.install(layer.self_attn, "efficient", call)


def loss_chunk(cfg: MemoryConfig, batch: int, vocab: int) -> int:
    """Positions per loss chunk: four fp32 (rows x vocab) arrays fit the block budget."""
    if cfg.loss_chunk:
        return cfg.loss_chunk
    return max(16, (cfg.block_mb << 20) // (16 * batch * vocab) // 16 * 16)


def stages(n_layers: int, per_stage: int):
    """[start, end) layer ranges, each starting at a kept checkpoint."""
    return [(s, min(s + per_stage, n_layers)) for s in range(0, n_layers, per_stage)]


def _vjp(module, fn, inputs, cotangent):
    """Cotangents of fn(*inputs) w.r.t. its inputs and the module's trainable parameters."""
    flat = tree_flatten(module.trainable_parameters())
    names = [n for n, _ in flat]

    def f(*args):
        module.update(tree_unflatten(list(zip(names, args[len(inputs) :]))))
        return fn(*args[: len(inputs)])

    try:
        _, grads = mx.vjp(f, list(inputs) + [p for _, p in flat], [cotangent])
    finally:
        module.update(tree_unflatten(flat))
    return grads[: len(inputs)], dict(zip(names, grads[len(inputs) :]))


class StagedStep:
    """Callable like `nn.value_and_grad(model, nll_sum)`: (model, tokens, lengths) ->
    ((summed NLL, token count), gradients of the summed NLL w.r.t. the trainable parameters).

    With a distributed `world` and `cfg.context_parallel`, the sums and gradients are this rank's share
    of its positions' (the caller sums them over the ranks)."""

    def __init__(self, model, cfg: MemoryConfig, on_stage=None, world=None):
        check_supported(model)
        self.cfg = cfg
        self.world = world if cfg.context_parallel and world is not None and world.distributed else None
        self.layout = None  # the context-parallel split of the sequence in hand
        self.block_bytes = cfg.block_mb << 20
        self.on_stage = on_stage or (lambda: None)
        self.mlp_width = model.args.intermediate_size
        layer_ids = {id(layer) for layer in model.layers}
        self.prefix = {id(m): name for name, m in model.named_modules() if id(m) in layer_ids}
        trainable = [i for i, layer in enumerate(model.layers) if tree_flatten(layer.trainable_parameters())]
        self.first_trainable = trainable[0] if trainable else len(model.layers)  # backward stops here
        inside = tuple(p + "." for p in self.prefix.values())
        outside = [n for n, _ in tree_flatten(model.trainable_parameters()) if not n.startswith(inside)]
        if outside:
            raise UserError(
                f"staged execution trains parameters inside transformer layers only; {outside[0]} is outside "
                "(set memory.staged: false)"
            )

    def _eval(self, *arrays):
        mx.eval(*arrays)
        self.on_stage()

    def _attention_half(self, layer, x, saved=None):
        xn = layer.input_layernorm(x)
        if self.layout is not None:
            out, saved = context_parallel.attend(layer.self_attn, xn, self.layout, self.block_bytes, saved)
            return x + out, saved
        if self.cfg.attention == "efficient":
            out, saved = _attend(layer.self_attn, xn, self.block_bytes, saved)
            return x + out, saved
        return x + layer.self_attn(xn, "causal"), None

    def _spans(self, h):
        """Position chunks for the MLP half: four fp32 (rows x intermediate) arrays per chunk fit the block."""
        rows = self.block_bytes // max(1, 16 * h.shape[0] * self.mlp_width)
        rows = max(128, rows // 128 * 128)
        return [(s, min(s + rows, h.shape[1])) for s in range(0, h.shape[1], rows)]

    @staticmethod
    def _mlp_half(layer, h):
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _forward(self, layer, x):
        h, _ = self._attention_half(layer, x)
        self._eval(h)
        parts = []
        for s, e in self._spans(h):
            parts.append(self._mlp_half(layer, h[:, s:e]))
            self._eval(parts[-1])
        out = mx.concatenate(parts, axis=1)
        self._eval(out)
        return out

    def _backward(self, layer, x, g, grads):
        """d(loss)/dx for one layer given d(loss)/d(layer output); adds parameter grads to `grads`."""
        prefix = self.prefix[id(layer)] + "."

        def add(pg):
            for name, value in pg.items():
                key = prefix + name
                grads[key] = value if key not in grads else grads[key] + value

        h, saved = self._attention_half(layer, x)
        self._eval(h, *(saved or ()))
        dh = []
        for s, e in self._spans(h):
            (d,), pg = _vjp(layer, lambda hc: self._mlp_half(layer, hc), [h[:, s:e]], g[:, s:e])
            add(pg)
            dh.append(d)
            self._eval(d, *grads.values())
        dh = mx.concatenate(dh, axis=1)
        del h
        (dx,), pg = _vjp(layer, lambda xx: self._attention_half(layer, xx, saved)[0], [x], dh)
        add(pg)
        self._eval(dx, *grads.values())
        return dx

    def _local(self, *arrays):
        """The rank's positions of each (B, L, ...) array (all of them without context parallelism)."""
        if self.world is None:
            return arrays
        self.layout = context_parallel.Layout(self.world, arrays[0].shape[1], context_parallel.ZIGZAG)
        return tuple(self.layout.local(a) for a in arrays)

    def target_nll(self, model, tokens, chunk: int = 128) -> np.ndarray:
        """(B, T-1) next-token NLL of every position, as `eval.target_nll`, through the staged forward (and
        across the ranks' positions with context parallelism: every rank gets the whole array)."""
        inputs, targets = self._local(tokens[:, :-1], tokens[:, 1:])
        h = model.model.embed_tokens(inputs)
        for layer in model.layers:
            h = self._forward(layer, h)
        head, norm, parts = head_of(model), model.model.norm, []
        for s in range(0, h.shape[1], chunk):
            parts.append(token_nll(head(norm(h[:, s : s + chunk])).astype(mx.float32), targets[:, s : s + chunk]))
            self._eval(parts[-1])
        nll = mx.concatenate(parts, axis=1)
        if self.layout is not None:
            gathered = context_parallel.gather_positions(nll[:, None, :, None], self.layout)
            nll = gathered[:, 0, : tokens.shape[1] - 1, 0]
        return np.array(nll, dtype=np.float64)

    def __call__(self, model, tokens, lengths):
        inputs, targets, weights = next_token_targets(tokens, lengths)
        inputs, targets, weights = self._local(inputs, targets, weights)
        layers = model.layers
        per_stage = self.cfg.layers_per_stage or 1
        plan = stages(len(layers), per_stage)
        h = model.model.embed_tokens(inputs)
        self._eval(h)
        checkpoints = []
        for start, end in plan:
            checkpoints.append(h)
            for layer in layers[start:end]:
                h = self._forward(layer, h)

        norm, head = model.model.norm, head_of(model)
        if self.cfg.loss == "chunked":
            chunk = loss_chunk(self.cfg, inputs.shape[0], model.args.vocab_size)
            loss_fn = lambda h: chunked_nll(norm(h), head, targets, weights, chunk)
        else:
            loss_fn = lambda h: (token_nll(head(norm(h)).astype(mx.float32), targets) * weights).sum()
        loss, g = mx.value_and_grad(loss_fn)(h)
        del h
        self._eval(loss, g)

        grads = {}
        for start, end in reversed(plan):
            if end <= self.first_trainable:
                break
            inputs_ = [checkpoints.pop()]
            for layer in layers[start : end - 1]:
                inputs_.append(self._forward(layer, inputs_[-1]))
            for i in reversed(range(max(start, self.first_trainable), end)):
                g = self._backward(layers[i], inputs_.pop(), g, grads)
            del inputs_
        checkpoints.clear()
        return (loss, weights.sum()), tree_unflatten(list(grads.items()))


def loss_and_grad(model, cfg: MemoryConfig, on_stage=None, world=None):
    """The step function `train` uses: staged, or one graph with the chosen attention and loss."""
    if cfg.attention == "efficient":
        use_efficient_attention(model, cfg.block_mb << 20)
    if cfg.context_parallel and not (cfg.staged and cfg.attention == "efficient"):
        raise UserError(
            "memory.context_parallel needs the memory engine's staged steps and attention "
            "(memory.policy engine or engine_sqrt)"
        )
    if cfg.staged:
        return StagedStep(model, cfg, on_stage, world)
    if cfg.loss == "chunked":
        vocab = model.args.vocab_size
        return nn.value_and_grad(model, lambda m, t, n: nll_sum_chunked(m, t, n, loss_chunk(cfg, t.shape[0], vocab)))
    return nn.value_and_grad(model, nll_sum)
