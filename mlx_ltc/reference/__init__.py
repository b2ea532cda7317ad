"""The PyTorch-CPU reference: an independent implementation of every numeric piece of mlx-ltc.

Each module here is the oracle for one MLX component, written from the definitions (or delegating
to transformers/torch, which were written by other people), never by translating our MLX code:

- `quant`: MLX's affine quantisation, dequantised from the packed bits;
- `lora`: mlx-lm's LoRA layer (same initialisation convention and scaling), on torch Linear layers;
- `ops`: softmax attention (the naive L x L oracle: causal, GQA, segments, sliding window) and
  the weighted next-token cross-entropy (torch's own cross_entropy);
- `optim`: AdamW (torch.optim.AdamW) and our LR schedule, from its formula;
- `model`: StarCoder2 and Llama forwards with transformers' own model classes, loading the very
  same weights (our quantized directory dequantised by `quant`, or transformers' GGUF loader for
  the embedded model);
- `backend`: `--backend torch`, the whole train pipeline on torch;
- `compare`: `mlx-ltc compare`, MLX against this package, quantity by quantity.

`TOLERANCES` is the one place the agreed deviations live; the parity tests and `compare` use it.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    abs: float  # max |mlx - ref| over the elements
    rel: float  # ||mlx - ref|| / ||ref|| (L2 over all elements)
    why: str


# A quantity passes when either bound holds. The whole-model rows were measured on smollm2-135m (30
# layers, vocabulary 49,152) against transformers' GGUF loader in fp32, with margin (see the README).
TOLERANCES = {
    "dequantize": Tolerance(0.0, 0.0, "scale * q + bias, the same single rounding: bitwise"),
    "lora": Tolerance(1e-5, 1e-6, "forward and gradients of one adapted layer"),
    "attention_forward": Tolerance(1e-5, 1e-6, "blocked two-level softmax vs one softmax"),
    "attention_grad": Tolerance(1e-4, 1e-5, "probabilities recomputed per block, blockwise accumulation"),
    "nll": Tolerance(1e-4, 1e-6, "summed over positions; vocabulary-wide logsumexp in two levels"),
    "nll_grad": Tolerance(1e-6, 1e-5, "softmax minus one-hot, per chunk"),
    "adamw": Tolerance(1e-6, 1e-5, "parameters after several updates"),
    "lr": Tolerance(1e-9, 1e-6, "float32 schedule vs float64 formula"),
    "model_forward": Tolerance(1e-4, 1e-5, "a small model's logits"),
    "logits": Tolerance(1e-3, 1e-4, "30 layers of fp32 accumulation in a different order"),
    "loss": Tolerance(1e-4, 1e-5, "mean NLL over all targets"),
    "lora_grads": Tolerance(0.0, 5e-3, "all LoRA gradients of a step; fp32 noise grows over 30 layers"),
    "grad_norm": Tolerance(0.0, 1e-3, "global norm before clipping, per step"),
    "loss_curve": Tolerance(5e-4, 0.0, "per-step training loss, free-running trajectories"),
    "lora_update": Tolerance(0.0, 5e-2, "W_N - W_0: Adam turns near-zero gradients into full-size steps"),
}


def deviation(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, ||ours - ref|| / ||ref||) of two array-likes (numpy, torch or MLX)."""
    import numpy as np

    a, b = _numpy(ours), _numpy(ref)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    d = float(np.abs(a - b).max())
    scale = float(np.linalg.norm(b))
    diff = float(np.linalg.norm(a - b))
    return d, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def within(name: str, ours, ref) -> tuple[bool, float, float]:
    d, r = deviation(ours, ref)
    t = TOLERANCES[name]
    return (d <= t.abs or r <= t.rel), d, r


def _numpy(x):
    import numpy as np

    if hasattr(x, "detach"):  # torch
        return x.detach().double().numpy()
    if type(x).__module__.startswith("mlx"):  # bfloat16 has no numpy buffer format
        import mlx.core as mx

        x = x.astype(mx.float32)
    return np.asarray(x, dtype=np.float64)
