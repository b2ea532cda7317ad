"""A causal language model whose token mixing is the BK core (`core.green_function`).

Each block: RMSNorm -> BK mixer -> residual -> RMSNorm -> mixture-of-experts SwiGLU -> residual.
Embeddings carry no positions (the recurrence is the only notion of order); the head is tied.

The BK mixer, per channel c: potential a_i = h0 + s tanh(W_v x_i / s), coupling k_i = softplus(W_k x_i + b)
to the next position, learnable energy E and broadening eta = softplus(theta) + eps. Its Green's function g
drives a semiseparable causal mixer y_i = rho_i y_{i-1} + (1 - rho_i) u_i with

    rho_i = k_{i-1} Im g_{i-1} / (eta + k_{i-1} Im g_{i-1})  in [0, 1),

the part of Im g_i inherited from the past (Im g_i = (eta + k_{i-1} Im g_{i-1}) |g_i|^2): eta sets how fast a
channel forgets, the couplings and potentials make it input-dependent. [eta Re g, eta Im g] (the unit disc)
go back to d_model as features.

`stream` carries per layer g, k of the last position and the mixer's y, so a sequence fed chunk by chunk
gives the one-shot logits.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from mlx_ltc.config import BkModelConfig
from mlx_ltc.research.bk.core import green_function
from mlx_ltc.research.bk.scan import linear_scan

__all__ = ["BKConfig", "BKModel", "LayerState", "scattering_experts"]


@dataclass
class BKConfig:
    """The model as its checkpoints record it: the command's sizes (config.BkModelConfig, whose defaults
    these are), the vocabulary and the architecture's constants."""

    vocab_size: int
    d_model: int = BkModelConfig.d_model
    n_layers: int = BkModelConfig.n_layers
    channels: int | None = BkModelConfig.channels  # BK channels per layer; d_model when None
    n_experts: int = BkModelConfig.n_experts
    top_k: int = BkModelConfig.top_k
    expert_hidden: int = BkModelConfig.expert_hidden
    router: str = BkModelConfig.router  # or "scattering": parameter-free, top-1 by the phase of g
    h0: float = 2.0  # diagonal of the free Hamiltonian (the discrete Laplacian)
    potential_scale: float = 2.0
    coupling_init: float = 1.0
    input_dependent_coupling: bool = True
    eta_init: tuple[float, float] = (1e-3, 1e-1)  # log-uniform per channel
    eta_floor: float = 1e-4
    norm_eps: float = 1e-5

    @property
    def bk_channels(self) -> int:
        return self.channels or self.d_model


class LayerState(NamedTuple):
    g_re: mx.array  # (B, C) g of the last position
    g_im: mx.array
    k: mx.array  # (B, C) its coupling to the next position
    y: mx.array  # (B, C) the mixer's output there


def _softplus_inverse(x):
    return math.log(math.expm1(x)) if isinstance(x, float) else mx.log(mx.expm1(x))


def scattering_experts(phase: mx.array, n_experts: int) -> mx.array:
    """Expert index from a phase in (0, pi) (Im g > 0): the half-plane split evenly over all experts."""
    return mx.clip(mx.floor(phase * (n_experts / math.pi)), 0, n_experts - 1).astype(mx.int32)


class BKMixer(nn.Module):
    def __init__(self, config: BKConfig):
        super().__init__()
        d, c = config.d_model, config.bk_channels
        self.h0, self.scale, self.eta_floor = config.h0, config.potential_scale, config.eta_floor
        self.potential = nn.Linear(d, c, bias=False)
        if config.input_dependent_coupling:
            self.coupling = nn.Linear(d, c)
            self.coupling.bias = mx.full((c,), _softplus_inverse(config.coupling_init))
        else:
            self.coupling_bias = mx.full((c,), _softplus_inverse(config.coupling_init))
        band = 2.0 * math.sqrt(config.coupling_init)  # spectrum of the free chain: h0 +- 2 sqrt(k)
        self.energy = config.h0 + mx.random.uniform(-band, band, (c,))
        lo, hi = (math.log(e) for e in config.eta_init)
        self.eta_logit = _softplus_inverse(mx.exp(mx.random.uniform(lo, hi, (c,))) - config.eta_floor)
        self.value = nn.Linear(d, c, bias=False)
        self.gate = nn.Linear(d, c, bias=False)
        self.out = nn.Linear(c, d, bias=False)
        self.spectral = nn.Linear(2 * c, d, bias=False)

    def eta(self) -> mx.array:
        return nn.softplus(self.eta_logit) + self.eta_floor

    def initial_state(self, batch: int) -> LayerState:
        zeros = mx.zeros((batch, self.energy.shape[0]))
        return LayerState(zeros, zeros, zeros, zeros)

    def __call__(self, x: mx.array, state: LayerState):
        """x (B, N, d) -> (out (B, N, d), phase (B, N) of the channel-summed eta g, new state)."""
        a = self.h0 + self.scale * mx.tanh(self.potential(x) / self.scale)
        k = nn.softplus(self.coupling(x) if "coupling" in self else mx.broadcast_to(self.coupling_bias, a.shape))
        k_prev = mx.concatenate([state.k[:, None], k[:, :-1]], axis=1)
        eta = self.eta()
        g_re, g_im = green_function(a, k_prev, self.energy, eta, (state.g_re, state.g_im))

        inherited = k_prev * mx.concatenate([state.g_im[:, None], g_im[:, :-1]], axis=1)
        rho = inherited / (eta + inherited)
        y = linear_scan(rho, (1 - rho) * self.value(x), state.y)

        features = mx.concatenate([eta * g_re, eta * g_im], axis=-1)
        out = self.out(y * nn.silu(self.gate(x))) + self.spectral(features)
        phase = mx.arctan2((eta * g_im).sum(-1), (eta * g_re).sum(-1))
        return out, phase, LayerState(g_re[:, -1], g_im[:, -1], k[:, -1], y[:, -1])


class MoE(nn.Module):
    def __init__(self, config: BKConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.top_k
        if config.router == "learned":
            self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        elif config.router != "scattering":
            raise ValueError(f"router must be 'learned' or 'scattering', not {config.router!r}")
        self.experts = SwitchGLU(config.d_model, config.expert_hidden, config.n_experts)

    def __call__(self, x: mx.array, phase: mx.array) -> mx.array:
        if "router" in self:
            logits = self.router(x)
            experts = mx.stop_gradient(mx.argpartition(-logits, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
            weights = mx.softmax(mx.take_along_axis(logits, experts, axis=-1), axis=-1, precise=True)
        else:
            experts = scattering_experts(mx.stop_gradient(phase), self.n_experts)[..., None]
            weights = mx.ones(experts.shape, dtype=x.dtype)
        return (self.experts(x, experts) * weights[..., None]).sum(axis=-2)


class Block(nn.Module):
    def __init__(self, config: BKConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = BKMixer(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = MoE(config)

    def __call__(self, x: mx.array, state: LayerState):
        mixed, phase, state = self.mixer(self.mixer_norm(x), state)
        x = x + mixed
        return x + self.ffn(self.ffn_norm(x), phase), state


class BKModel(nn.Module):
    def __init__(self, config: BKConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [Block(config) for _ in range(config.n_layers)]
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)

    def initial_state(self, batch: int) -> list[LayerState]:
        return [layer.mixer.initial_state(batch) for layer in self.layers]

    def hidden(self, tokens: mx.array, state: list[LayerState] | None = None):
        """tokens (B, N) int -> (final normed hidden states (B, N, d), state after the last token): the
        logits are `embed.as_linear` of them, which a chunked loss applies a few positions at a time."""
        state = state or self.initial_state(tokens.shape[0])
        x = self.embed(tokens)
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            x, layer_state = layer(x, layer_state)
            new_state.append(layer_state)
        return self.norm(x), new_state

    def stream(self, tokens: mx.array, state: list[LayerState] | None = None):
        """tokens (B, N) int -> (logits (B, N, V), state after the last token); state=None starts fresh."""
        hidden, state = self.hidden(tokens, state)
        return self.embed.as_linear(hidden), state

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.stream(tokens)[0]
