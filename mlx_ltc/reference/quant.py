"""MLX's affine quantisation, dequantised from first principles.

A row of n weights is split into groups of `group_size`; element j of a group is stored as a
`bits`-bit unsigned integer q and means scale * q + bias (one scale and bias per group). The
integers are packed little-endian into uint32 words as one continuous bit stream: element i of a row
occupies bits [i * bits, (i + 1) * bits) of the row's words.
"""

import numpy as np
import torch


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """(..., words) uint32 -> (..., n) integers."""
    raw = np.ascontiguousarray(packed, dtype="<u4").view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")[..., : n * bits]
    digits = stream.reshape(*stream.shape[:-1], n, bits).astype(np.int64)
    return digits @ (1 << np.arange(bits, dtype=np.int64))


def dequantize(packed, scales, biases, group_size: int, bits: int, dtype=torch.float32) -> torch.Tensor:
    """Weights (out, in) from packed (out, in * bits / 32) uint32 and (out, in / group_size) scales/biases."""
    packed = np.asarray(packed)
    n = packed.shape[-1] * 32 // bits
    q = torch.from_numpy(unpack(packed, bits, n)).to(dtype)
    scales, biases = (torch.as_tensor(np.asarray(a, dtype=np.float64)).to(dtype) for a in (scales, biases))
    groups = q.reshape(*q.shape[:-1], n // group_size, group_size)
    return (groups * scales[..., None] + biases[..., None]).reshape(q.shape)
