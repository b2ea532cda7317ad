"""Prefix scans along the sequence axis (axis 1) with plain mx ops: O(N) work, 2 log2 N levels.

Complex numbers are (real, imag) pairs of arrays throughout the BK package: MLX's complex support on
CPU is partial, and the explicit form keeps every op differentiable and kernel-friendly.
"""

import mlx.core as mx

__all__ = ["associative_scan", "cmul", "complex_linear_scan", "linear_scan"]


def associative_scan(combine, elems: tuple) -> tuple:
    """Inclusive scan of a tuple of (B, N, ...) arrays: out_i = e_0 . e_1 . ... . e_i.

    combine(earlier, later) must be associative (not commutative). Odd-even recursion: combine
    neighbouring pairs, scan the half-length sequence, then fill in the even positions.
    """
    n = elems[0].shape[1]
    if n < 2:
        return elems
    half = n // 2
    pairs = combine(tuple(e[:, 0 : 2 * half : 2] for e in elems), tuple(e[:, 1::2] for e in elems))
    odd = associative_scan(combine, pairs)  # prefixes ending at 1, 3, 5, ...
    even = combine(tuple(o[:, : (n - 1) // 2] for o in odd), tuple(e[:, 2::2] for e in elems))  # 2, 4, ...
    return tuple(_interleave(mx.concatenate([e[:, :1], ev], axis=1), od) for e, ev, od in zip(elems, even, odd))


def _interleave(even: mx.array, odd: mx.array) -> mx.array:
    """even (B, ceil(n/2), ...) and odd (B, floor(n/2), ...) -> (B, n, ...) in position order."""
    m = odd.shape[1]
    paired = mx.stack([even[:, :m], odd], axis=2).reshape(even.shape[0], 2 * m, *even.shape[2:])
    return paired if even.shape[1] == m else mx.concatenate([paired, even[:, m:]], axis=1)


def linear_scan(decay: mx.array, inputs: mx.array, initial: mx.array | None = None) -> mx.array:
    """y_i = decay_i * y_{i-1} + inputs_i along axis 1, y_{-1} = initial (B, ...) or 0."""
    if initial is not None:
        inputs = mx.concatenate([inputs[:, :1] + decay[:, :1] * initial[:, None], inputs[:, 1:]], axis=1)

    def combine(earlier, later):
        return later[0] * earlier[0], later[1] + later[0] * earlier[1]

    return associative_scan(combine, (decay, inputs))[1]


def cmul(a_re, a_im, b_re, b_im):
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


def complex_linear_scan(decay: tuple, inputs: tuple, reverse: bool = False) -> tuple:
    """Complex y_i = decay_i y_{i-1} + inputs_i (or y_i = decay_i y_{i+1} + inputs_i with reverse)."""
    elems = (*decay, *inputs)
    if reverse:
        elems = tuple(e[:, ::-1] for e in elems)

    def combine(earlier, later):
        m_re, m_im = cmul(*later[:2], *earlier[:2])
        b_re, b_im = cmul(*later[:2], *earlier[2:])
        return m_re, m_im, later[2] + b_re, later[3] + b_im

    y = associative_scan(combine, elems)[2:]
    return tuple(e[:, ::-1] for e in y) if reverse else y
