"""The causal BK core: the leading-block Green's function of a tridiagonal Hamiltonian, per channel.

H_{0..i} has diagonal a_0..a_i and off-diagonal products k_j > 0; z = E + i eta, eta > 0. Its last diagonal
resolvent entry g_i = [(H_{0..i} - z)^-1]_ii obeys

    g_i = 1 / (alpha_i - k_{i-1} g_{i-1}),   alpha_i = a_i - z,

so g_i depends on positions <= i only, Im g_i > 0 and |g_i| <= 1 / eta. Each step is the Moebius map of
M_i = [[0, 1], [-k_{i-1}, alpha_i]] acting on (p, q) with g = p / q, so g comes from an associative scan of
2x2 complex matrix products, normalised as they go (g is a ratio, the scale cancels).

The backward is the adjoint of the recurrence, lambda_i = gbar_i + conj(k_i g_{i+1}^2) lambda_{i+1} (gbar: the
cotangent dL/dRe g + i dL/dIm g), a reverse linear scan; every parameter's gradient is then local in i:
dL/da_i = -Re(conj(lambda_i) g_i^2), dL/dk_{i-1} = Re(conj(lambda_i) g_i^2 g_{i-1}), and E, eta through z.

`k_prev` below is aligned with g: k_prev[:, i] = k_{i-1}, the coupling to the previous position, and
(g_init, k_prev[:, 0]) is the streaming state, g and k of the previous chunk's last position.
"""

from functools import reduce

import mlx.core as mx

from mlx_ltc.research.bk import kernel
from mlx_ltc.research.bk.scan import associative_scan, cmul, complex_linear_scan

__all__ = ["green_function"]


def _matmul(earlier, later):
    """later @ earlier of 2x2 complex matrices stored as 8 real arrays (11, 12, 21, 22; re, im), rescaled."""
    e11, e12, e21, e22 = earlier[0:2], earlier[2:4], earlier[4:6], earlier[6:8]
    l11, l12, l21, l22 = later[0:2], later[2:4], later[4:6], later[6:8]

    def entry(a, b, c, d):
        (re1, im1), (re2, im2) = cmul(*a, *b), cmul(*c, *d)
        return re1 + re2, im1 + im2

    parts = (*entry(l11, e11, l12, e21), *entry(l11, e12, l12, e22))
    parts += (*entry(l21, e11, l22, e21), *entry(l21, e12, l22, e22))
    scale = 1.0 / reduce(mx.maximum, [mx.abs(p) for p in parts])
    return tuple(p * scale for p in parts)


def _green(a, k_prev, energy, eta, g_init_re, g_init_im):
    alpha_re = a - energy
    alpha_im = mx.broadcast_to(-eta, a.shape)
    zeros, ones = mx.zeros_like(a), mx.ones_like(a)
    steps = (zeros, zeros, ones, zeros, -k_prev, zeros, alpha_re, alpha_im)
    m11_re, m11_im, m12_re, m12_im, m21_re, m21_im, m22_re, m22_im = associative_scan(_matmul, steps)
    g0_re, g0_im = g_init_re[:, None], g_init_im[:, None]
    num_re, num_im = cmul(m11_re, m11_im, g0_re, g0_im)
    den_re, den_im = cmul(m21_re, m21_im, g0_re, g0_im)
    num_re, num_im = num_re + m12_re, num_im + m12_im
    den_re, den_im = den_re + m22_re, den_im + m22_im
    inv = 1.0 / (den_re * den_re + den_im * den_im)
    return (num_re * den_re + num_im * den_im) * inv, (num_im * den_re - num_re * den_im) * inv


def _sum_to(x: mx.array, shape) -> mx.array:
    """Reduce a broadcast gradient back to the primal's shape."""
    extra = x.ndim - len(shape)
    axes = list(range(extra)) + [extra + i for i, s in enumerate(shape) if s == 1 and x.shape[extra + i] != 1]
    return x.sum(axis=axes, keepdims=True).reshape(shape) if axes else x


def _shift_in(first: mx.array, x: mx.array) -> mx.array:
    """(first, x_0, ..., x_{N-2}) along axis 1: x delayed by one position."""
    return mx.concatenate([first[:, None], x[:, :-1]], axis=1)


@mx.custom_function
def _green_core(a, k_prev, energy, eta, g_init_re, g_init_im):
    return _green(a, k_prev, energy, eta, g_init_re, g_init_im)


@_green_core.vjp
def _green_core_vjp(primals, cotangents, outputs):
    a, k_prev, energy, eta, g_init_re, g_init_im = primals
    g_re, g_im = outputs
    sq_re, sq_im = cmul(g_re, g_im, g_re, g_im)
    # d g_{i+1} / d g_i = k_i g_{i+1}^2; the adjoint runs backwards with its conjugate.
    step_re, step_im = k_prev * sq_re, k_prev * sq_im
    zero = mx.zeros_like(step_re[:, :1])
    decay = (mx.concatenate([step_re[:, 1:], zero], axis=1), -mx.concatenate([step_im[:, 1:], zero], axis=1))
    lam_re, lam_im = complex_linear_scan(decay, tuple(cotangents), reverse=True)
    w_re, w_im = cmul(lam_re, -lam_im, sq_re, sq_im)  # conj(lambda) g^2
    prev_re, prev_im = _shift_in(g_init_re, g_re), _shift_in(g_init_im, g_im)
    d_k_prev = cmul(w_re, w_im, prev_re, prev_im)[0]
    d_init_re, d_init_im = cmul(step_re[:, 0], -step_im[:, 0], lam_re[:, 0], lam_im[:, 0])
    return (-w_re, d_k_prev, _sum_to(w_re, energy.shape), _sum_to(-w_im, eta.shape), d_init_re, d_init_im)


def green_function(a, k_prev, energy, eta, g_init=None, use_kernel=None):
    """g = (re, im), each (B, N, C) float32, of potentials a and couplings k_prev (B, N, C) > 0, at
    z = energy + i eta (arrays broadcastable to (B, N, C), eta > 0). g_init = (re, im) (B, C): g of the
    position before a[:, 0] (the streaming state; zero = start of the sequence).

    use_kernel: None takes the GPU kernels (`kernel.applies`) where they apply, else these ops."""
    if g_init is None:
        g_init = (mx.zeros_like(a[:, 0]), mx.zeros_like(a[:, 0]))
    if kernel.applies(a, energy, eta) if use_kernel is None else use_kernel:
        return kernel.green_function_kernel(a, k_prev, energy, eta, g_init)
    return _green_core(a, k_prev, energy, eta, *g_init)
