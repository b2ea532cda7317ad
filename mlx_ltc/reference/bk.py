"""Oracle for `mlx_ltc.research.bk`: the BK core and model as plain sequential loops in torch float64.

Written from the definitions, position by position (no scans, no custom backward): torch autograd
differentiates the loops. `model_logits` takes the MLX model's parameters by their flattened names.
"""

import torch
import torch.nn.functional as F


def green(a, k_prev, energy, eta, g_init=None):
    """g_i = 1 / (a_i - z - k_prev_i g_{i-1}), z = energy + i eta, g_{-1} = g_init (0 when None).

    a, k_prev (B, N, C) real; energy, eta (C,); g_init (B, C) complex. Returns (B, N, C) complex."""
    z = torch.complex(energy, eta)
    g = torch.zeros_like(a[:, 0], dtype=z.dtype) if g_init is None else g_init
    out = []
    for i in range(a.shape[1]):
        g = 1 / (a[:, i] - z - k_prev[:, i] * g)
        out.append(g)
    return torch.stack(out, dim=1)


def decaying_sum(decay, inputs, initial=None):
    """y_i = sum_{j <= i} (prod_{j < m <= i} decay_m) inputs_j (+ the carried-in y_{-1} = initial), as a loop."""
    y = torch.zeros_like(inputs[:, 0]) if initial is None else initial
    out = []
    for i in range(inputs.shape[1]):
        y = decay[:, i] * y + inputs[:, i]
        out.append(y)
    return torch.stack(out, dim=1)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def bk_mixer(p, prefix, config, x):
    """One BK mixer, from the definitions in `mlx_ltc.research.bk.model`'s docstring; x (B, N, d)."""
    s = config.potential_scale
    a = config.h0 + s * torch.tanh(x @ p[prefix + "potential.weight"].T / s)
    if prefix + "coupling.weight" in p:
        k = F.softplus(x @ p[prefix + "coupling.weight"].T + p[prefix + "coupling.bias"])
    else:
        k = F.softplus(p[prefix + "coupling_bias"]).expand_as(a)
    k_prev = F.pad(k[:, :-1], (0, 0, 1, 0))
    eta = F.softplus(p[prefix + "eta_logit"]) + config.eta_floor
    g = green(a, k_prev, p[prefix + "energy"], eta)
    g_prev = F.pad(g[:, :-1], (0, 0, 1, 0))
    inherited = k_prev * g_prev.imag
    rho = inherited / (eta + inherited)
    y = decaying_sum(rho, (1 - rho) * (x @ p[prefix + "value.weight"].T))
    gated = y * F.silu(x @ p[prefix + "gate.weight"].T)
    features = torch.cat([eta * g.real, eta * g.imag], dim=-1)
    return gated @ p[prefix + "out.weight"].T + features @ p[prefix + "spectral.weight"].T


def moe(p, prefix, config, x):
    """Learned top-k router, softmax over the chosen logits, SwiGLU experts (each evaluated densely)."""
    logits = x @ p[prefix + "router.weight"].T
    top, experts = logits.topk(config.top_k, dim=-1)
    weights = torch.softmax(top, dim=-1)
    w_gate, w_up, w_down = (p[prefix + f"experts.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    hidden = F.silu(torch.einsum("bnd,ehd->bneh", x, w_gate)) * torch.einsum("bnd,ehd->bneh", x, w_up)
    every = torch.einsum("bneh,edh->bned", hidden, w_down)
    chosen = every.gather(2, experts[..., None].expand(*experts.shape, every.shape[-1]))
    return (chosen * weights[..., None]).sum(dim=2)


def model_logits(params, config, tokens):
    """Logits (B, N, V) of a BKModel with a learned router; params: {flattened MLX name: tensor}."""
    if config.router != "learned":
        raise ValueError("the reference model covers the learned router only")
    x = params["embed.weight"][tokens]
    for i in range(config.n_layers):
        prefix = f"layers.{i}."
        h = rms_norm(x, params[prefix + "mixer_norm.weight"], config.norm_eps)
        x = x + bk_mixer(params, prefix + "mixer.", config, h)
        h = rms_norm(x, params[prefix + "ffn_norm.weight"], config.norm_eps)
        x = x + moe(params, prefix + "ffn.", config, h)
    return rms_norm(x, params["norm.weight"], config.norm_eps) @ params["embed.weight"].T
