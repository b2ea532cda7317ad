"""The initial LoRA A matrices, drawn from numpy so the MLX and torch backends start identically."""

import zlib

import numpy as np


def lora_a_init(name: str, input_dims: int, rank: int, seed: int) -> np.ndarray:
    """The initial LoRA A of adapter `name` (e.g. model.layers.3.self_attn.q_proj): mlx-lm's
    convention, U(-1/sqrt(in), 1/sqrt(in)), drawn from numpy so both backends start identically."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    bound = 1 / np.sqrt(input_dims)
    return rng.uniform(-bound, bound, size=(input_dims, rank)).astype(np.float32)
