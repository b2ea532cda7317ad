"""Does MLX's `mx.fast.scaled_dot_product_attention` backward avoid the L x L score matrix?

For the memory planner: a training step whose attention backward falls back to the unfused graph
(scores = q @ k.T, softmax, @ v, differentiated op by op) holds B x H x L x L scores; a fused
backward holds only O(L) statistics.

Provenance: MLX source, github.com/ml-explore/mlx at 846d176 (2026-08-22; after tag v0.32.1,
mlx/version.h 0.32.2). The same conditions are in v0.32.1. The installed wheel here is 0.32.4,
whose header mlx/fast_primitives.h adds a `has_sinks` argument to
ScaledDotProductAttention::use_fallback. The 0.32.4 .cpp files were not available, so they were
not read.

- mlx/fast.cpp, scaled_dot_product_attention(): `is_training = detail::in_grad_tracing()`,
  `has_fast_vjp = !ScaledDotProductAttentionVJP::use_fallback(q, stream)`, and
  `output_logsumexp = is_training && has_fast_vjp`. The fused primitive is built only if
  `!ScaledDotProductAttention::use_fallback(...)`; otherwise the unfused `fallback` lambda runs.
  ScaledDotProductAttention::vjp() returns `Custom::vjp` (differentiating the unfused lambda,
  so L x L) whenever `ScaledDotProductAttentionVJP::use_fallback(primals[0], s)` is true.
- CPU, mlx/backend/no_gpu/primitives.cpp: both use_fallback functions `return true`. The CUDA
  build's has_fused_kernel() has "the fused kernels require a GPU stream", and its VJP
  use_fallback has `return s.device == Device::cpu`.
- CUDA, mlx/backend/cuda/scaled_dot_product_attention.cpp:
  ScaledDotProductAttentionVJP::use_fallback: `if (q.shape(2) % 128 != 0) return true;`.
  In training, the forward must be the cuDNN one, because supports_sdpa_vector() (.cu) returns
  false when output_logsumexp is set. supports_sdpa_cudnn() requires
  `compute_capability_major() >= 8`; `q.shape(-1) % 8 == 0 && q.shape(-1) <= 128` (same for v);
  `dtype == float16 || dtype == bfloat16`; and not `do_causal && T_q > T_kv`. If it fails, the
  forward is the fallback and autodiff differentiates that graph. Added in v0.30.0
  ("[CUDA] cuDNN forward attention" #2743, "[CUDA] cuDNN backward attention" #2762).
- Metal, mlx/backend/metal/scaled_dot_product_attention.cpp: ScaledDotProductAttention::
  use_fallback has `if (is_training) return true;` ("faster for training on Metal to use the
  unfused SDPA for both forward and backward"), and ScaledDotProductAttentionVJP::use_fallback
  has `return true;`.
"""

BACKENDS = ("cpu", "cuda", "metal")
DTYPES = ("fp32", "bf16", "fp16")
MASKS = ("causal", "none", "array")


def fused_vjp(backend: str, head_dim: int, dtype: str, mask: str = "causal", *, seq_len=None) -> tuple[bool, str]:
    """(True if MLX's sdpa backward on `backend` avoids the L x L score matrix in a training step,
    a one-line reason citing MLX's source). `mask`: "causal" (the string mode), "none", or
    "array" (an explicit mask array). `seq_len`: query length L, checked on CUDA when given."""
    if backend not in BACKENDS or dtype not in DTYPES or mask not in MASKS:
        raise ValueError(f"backend in {BACKENDS}, dtype in {DTYPES}, mask in {MASKS}; got {backend}, {dtype}, {mask}")
    if backend == "cpu":
        return False, "no_gpu/primitives.cpp: ScaledDotProductAttentionVJP::use_fallback returns true (unfused VJP)"
    if backend == "metal":
        return False, (
            "metal/scaled_dot_product_attention.cpp: ScaledDotProductAttentionVJP::use_fallback returns true, "
            "and the forward falls back when is_training"
        )
    if mask == "array":
        return False, "fast.cpp: an array mask is itself L_q x L_kv (broadcast to B,H,L_q,L_kv; a bool one made dense)"
    if dtype == "fp32":
        return False, "cuda: supports_sdpa_cudnn needs float16/bfloat16, and supports_sdpa_vector is off with logsumexp"
    if head_dim % 8 != 0 or head_dim > 128:
        return False, f"cuda: supports_sdpa_cudnn needs head_dim % 8 == 0 and <= 128 (got {head_dim})"
    if seq_len is not None and seq_len % 128 != 0:
        return False, f"cuda: ScaledDotProductAttentionVJP::use_fallback when q.shape(2) % 128 != 0 (L={seq_len})"
    checked = "L % 128 == 0" if seq_len is not None else "needs L % 128 == 0 (not checked)"
    return True, f"cuda: cuDNN forward + sdpa_backward_cudnn (MLX >= 0.30.0); {checked}, and needs sm80+ (Ampere)"
