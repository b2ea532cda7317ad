"""The BK core as GPU kernels: kernels/bk_scan_body.h under mx.fast.metal_kernel or mx.fast.cuda_kernel.

One body, three preludes (kernels/bk_scan.metal, bk_scan.cu, bk_scan_cpu.cpp): `assemble` puts
"#define BK_PART n" + prelude + body together, part 0 as the kernel header and parts 1-6 as the six kernel
sources. One thread runs one (batch, chunk of L positions, channel) sequentially, in float32; chunks are
joined by the exact carried state (forward, g before the chunk through each chunk's Moebius map; backward,
the adjoint lambda after it through each chunk's affine map), so the latency is ~2L + N / L steps, not N.

What runs where: on CPU-only machines (CI) `cpu_source` compiles the same body with the system C++ compiler
and tests/test_bk_kernels.py checks it against the float64 reference, through the same `scan_forward` /
`scan_backward` and the same mx.custom_function glue; the Metal and CUDA sources are only assembled and
parsed as C++ there. The CUDA prelude runs on a CUDA machine (scripts/run_bk_kernels_on_gpu.py, not yet run);
the Metal prelude (one line of code and one macro) is executed by nothing in this project's checks.

`core.green_function` takes these kernels where `applies` says so (opt-in: MLX_LTC_BK_KERNEL=1), else the ops scan.
"""

import math
import os
from functools import cache
from pathlib import Path

import mlx.core as mx

__all__ = ["available", "applies", "green_function_kernel", "make_green_function", "scan_forward", "scan_backward"]

KERNEL_DIR = Path(__file__).with_name("kernels")
PRELUDES = {"metal": "bk_scan.metal", "cuda": "bk_scan.cu", "cpu": "bk_scan_cpu.cpp"}
THREADGROUP = 256

# name: (BK_PART in bk_scan_body.h, inputs, outputs). All float32 but dims = (B, N, C, L), int32.
KERNELS = {
    "bk_forward_maps": (1, ("a", "k_prev", "energy", "eta", "dims"), ("maps",)),
    "bk_forward_carry": (2, ("maps", "g_init_re", "g_init_im", "dims"), ("start_re", "start_im")),
    "bk_forward_apply": (3, ("a", "k_prev", "energy", "eta", "start_re", "start_im", "dims"), ("g_re", "g_im")),
    "bk_backward_maps": (4, ("k_prev", "g_re", "g_im", "cot_re", "cot_im", "dims"), ("adjoint_maps",)),
    "bk_backward_carry": (5, ("adjoint_maps", "dims"), ("end_re", "end_im")),
    "bk_backward_apply": (
        6,
        ("k_prev", "g_re", "g_im", "cot_re", "cot_im", "g_init_re", "g_init_im", "end_re", "end_im", "dims"),
        ("grad_a", "grad_k_prev", "grad_energy_part", "grad_eta_part", "grad_g_init_re", "grad_g_init_im"),
    ),
}


def assemble(backend: str, part: int) -> str:
    prelude, body = ((KERNEL_DIR / f).read_text() for f in (PRELUDES[backend], "bk_scan_body.h"))
    return f"#define BK_PART {part}\n{prelude}\n{body}\n#undef BK_PART\n"


def cpu_source() -> str:
    """The six kernels as extern "C" functions of MLX's parameters plus the thread count, for a C++ compiler."""
    functions = ["#include <cstdint>", assemble("cpu", 0)]
    for name, (part, inputs, outputs) in KERNELS.items():
        params = [f"const {'int32_t' if n == 'dims' else 'float'}* {n}" for n in inputs]
        params += [f"float* {n}" for n in outputs] + ["int bk_threads"]
        functions.append(f'extern "C" void {name}({", ".join(params)}) {{\n{assemble("cpu", part)}}}\n')
    return "\n".join(functions)


def default_chunk(n: int) -> int:
    """The power of two nearest sqrt(n), in [16, 1024]: minimises the ~2L + N / L sequential steps."""
    return min(1024, max(16, 1 << round(math.log2(max(n, 1)) / 2)))


def scan_forward(launch, a, k_prev, energy, eta, g_init_re, g_init_im, chunk: int):
    """[g_re, g_im] (B, N, C). launch(name, inputs, output_shapes, threads) -> outputs runs one kernel."""
    b, n, c = a.shape
    j = -(-n // chunk)
    dims = (b, n, c, chunk)
    if j > 1:
        (maps,) = launch("bk_forward_maps", [a, k_prev, energy, eta, dims], [(b, j, 6, c)], b * j * c)
        start = launch("bk_forward_carry", [maps, g_init_re, g_init_im, dims], [(b, j, c)] * 2, b * c)
    else:
        start = [g_init_re.reshape(b, 1, c), g_init_im.reshape(b, 1, c)]
    return launch("bk_forward_apply", [a, k_prev, energy, eta, *start, dims], [(b, n, c)] * 2, b * j * c)


def scan_backward(launch, xp, k_prev, g_re, g_im, cot_re, cot_im, g_init_re, g_init_im, chunk: int):
    """Gradients for (a, k_prev, energy (C,), eta (C,), g_init_re, g_init_im); xp: numpy or mlx.core."""
    b, n, c = g_re.shape
    j = -(-n // chunk)
    dims = (b, n, c, chunk)
    if j > 1:
        adjoint = launch("bk_backward_maps", [k_prev, g_re, g_im, cot_re, cot_im, dims], [(b, j, 4, c)], b * j * c)
        end = launch("bk_backward_carry", [*adjoint, dims], [(b, j, c)] * 2, b * c)
    else:
        end = [xp.zeros((b, 1, c), dtype=xp.float32)] * 2
    inputs = [k_prev, g_re, g_im, cot_re, cot_im, g_init_re, g_init_im, *end, dims]
    shapes = [(b, n, c)] * 2 + [(b, j, c)] * 2 + [(b, c)] * 2
    outputs = launch("bk_backward_apply", inputs, shapes, b * j * c)
    grad_a, grad_k_prev, energy_part, eta_part, init_re, init_im = outputs
    return grad_a, grad_k_prev, energy_part.sum(axis=(0, 1)), eta_part.sum(axis=(0, 1)), init_re, init_im


def make_green_function(launch, chunk: int | None = None):
    """(a, k_prev, energy (C,), eta (C,), g_init_re, g_init_im) -> (g_re, g_im), float32, on the kernels that
    launch runs, differentiable through the adjoint kernels."""

    def chunk_for(a):
        return chunk or default_chunk(a.shape[1])

    @mx.custom_function
    def green(a, k_prev, energy, eta, g_init_re, g_init_im):
        return tuple(scan_forward(launch, a, k_prev, energy, eta, g_init_re, g_init_im, chunk_for(a)))

    @green.vjp
    def green_vjp(primals, cotangents, outputs):
        a, k_prev, _, _, g_init_re, g_init_im = primals
        return scan_backward(launch, mx, k_prev, *outputs, *cotangents, g_init_re, g_init_im, chunk_for(a))

    return green


def available() -> str | None:
    """The kernel backend of this MLX build: "metal", "cuda" or None."""
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else None


def _per_channel(x, channels: int):
    """x as (C,) when it varies by channel only, else None."""
    x = x if isinstance(x, mx.array) else mx.array(x)
    if x.ndim > 3 or any(s != 1 for s in x.shape[:-1]):
        return None
    return mx.broadcast_to(x.reshape(-1) if x.ndim else x, (channels,))


def applies(a, energy, eta) -> bool:
    """Whether green_function should take the kernel: asked for (MLX_LTC_BK_KERNEL=1: opt-in until the Metal and
    CUDA builds have run on a GPU, see scripts/run_bk_kernels_on_gpu.py), a GPU kernel backend on the default device,
    energy and eta per channel, int32 indices."""
    if os.environ.get("MLX_LTC_BK_KERNEL", "0") != "1" or available() is None or mx.default_device() != mx.gpu:
        return False
    c = a.shape[-1]
    return a.ndim == 3 and a.size < 2**31 and _per_channel(energy, c) is not None and _per_channel(eta, c) is not None


@cache
def _mlx_launch(backend: str):
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel

    @cache
    def kernel(name):
        part, inputs, outputs = KERNELS[name]
        return make(
            name=name,
            input_names=list(inputs),
            output_names=list(outputs),
            source=assemble(backend, part),
            header=assemble(backend, 0),
        )

    def launch(name, inputs, output_shapes, threads):
        arrays = [mx.array(x, dtype=mx.int32) if isinstance(x, tuple) else x for x in inputs]
        return kernel(name)(
            inputs=arrays,
            output_shapes=output_shapes,
            output_dtypes=[mx.float32] * len(output_shapes),
            grid=(threads, 1, 1),
            threadgroup=(THREADGROUP, 1, 1),
        )

    return launch


@cache
def _gpu_green(backend: str, chunk: int | None):
    return make_green_function(_mlx_launch(backend), chunk)


def green_function_kernel(a, k_prev, energy, eta, g_init=None, chunk: int | None = None, launch=None):
    """`core.green_function` on the kernels (energy and eta per channel); launch: another kernel runner (the
    compiled CPU body in the tests), else this machine's GPU backend."""
    c = a.shape[-1]
    if g_init is None:
        g_init = (mx.zeros_like(a[:, 0]), mx.zeros_like(a[:, 0]))
    energy, eta = _per_channel(energy, c), _per_channel(eta, c)
    if energy is None or eta is None:
        raise ValueError("the BK kernels take energy and eta per channel, shape (C,)")
    green = make_green_function(launch, chunk) if launch else _gpu_green(available(), chunk)
    k_prev = mx.broadcast_to(k_prev, a.shape)
    return green(*(x.astype(mx.float32) for x in (a, k_prev, energy, eta, *g_init)))
