import pytest

from mlx_ltc.hardware.attention_paths import fused_vjp


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_cpu_and_metal_backward_is_never_fused(dtype):
    for backend in ("cpu", "metal"):
        ok, reason = fused_vjp(backend, 64, dtype)
        assert ok is False and "use_fallback" in reason


def test_cuda_fused_for_half_precision_causal():
    for dtype in ("bf16", "fp16"):
        assert fused_vjp("cuda", 64, dtype)[0] is True
        assert fused_vjp("cuda", 128, dtype, seq_len=1024)[0] is True


@pytest.mark.parametrize(
    "args, kwargs",
    [
        (("cuda", 64, "fp32"), {}),  # cuDNN needs fp16/bf16
        (("cuda", 256, "bf16"), {}),  # head_dim > 128
        (("cuda", 60, "bf16"), {}),  # head_dim % 8 != 0
        (("cuda", 64, "bf16", "array"), {}),  # the mask is L x L
        (("cuda", 64, "bf16"), {"seq_len": 1000}),  # L % 128 != 0
    ],
)
def test_cuda_unfused_cases(args, kwargs):
    ok, reason = fused_vjp(*args, **kwargs)
    assert ok is False and reason


def test_rejects_unknown_values():
    with pytest.raises(ValueError):
        fused_vjp("rocm", 64, "bf16")
