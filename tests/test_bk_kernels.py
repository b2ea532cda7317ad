"""The BK kernels' shared body (mlx_ltc/research/bk/kernels/bk_scan_body.h), compiled for the CPU with the system C++
compiler through its C++ prelude, against the torch float64 reference and the MLX ops fallback.

This checks the algorithm every backend runs and the Python side around it (scan_forward/scan_backward,
the mx.custom_function glue); the Metal and CUDA preludes are only assembled and syntax-checked as C++
here. The CUDA run is scripts/run_bk_kernels_on_gpu.py, on a CUDA machine.
"""

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from test_bk import CORE_ARGS, as_torch, complex_parts, core_inputs, relative, torch_green

from mlx_ltc.research.bk import kernel
from mlx_ltc.research.bk.core import green_function
from mlx_ltc.reference import deviation

ROOT = Path(__file__).resolve().parent.parent
COMPILER = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (g++, c++, clang++) on PATH")


@pytest.fixture(scope="module")
def cpu_kernels(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("no C++ compiler (g++, c++, clang++) on PATH")
    src = tmp_path_factory.mktemp("bk_kernels") / "bk_scan.cpp"
    src.write_text(kernel.cpu_source())
    lib = src.with_suffix(".so")
    subprocess.run([COMPILER, "-O2", "-std=c++17", "-Wall", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def numpy_launch(lib):
    """Runs one kernel of the compiled body: outputs start as NaN (an unwritten element shows), and the thread
    count is rounded up to whole threadgroups as CUDA launches it (the body must skip the extra threads)."""

    def launch(name, inputs, output_shapes, threads):
        arrays = [np.ascontiguousarray(x, dtype=np.int32 if isinstance(x, tuple) else np.float32) for x in inputs]
        outputs = [np.full(shape, np.nan, dtype=np.float32) for shape in output_shapes]
        padded = -(-threads // kernel.THREADGROUP) * kernel.THREADGROUP
        getattr(lib, name)(*(ctypes.c_void_p(x.ctypes.data) for x in arrays + outputs), ctypes.c_int(padded))
        return outputs

    return launch


def mlx_launch(lib):
    run = numpy_launch(lib)
    return lambda name, inputs, *rest: [
        mx.array(y) for y in run(name, [np.array(x) if isinstance(x, mx.array) else x for x in inputs], *rest)
    ]


def kernel_green(lib, x, chunk):
    g_re, g_im = kernel.scan_forward(numpy_launch(lib), *(x[k] for k in CORE_ARGS), chunk)
    return g_re + 1j * g_im


def kernel_grads(lib, x, cot, chunk):
    g = kernel_green(lib, x, chunk)
    inputs = (x["k_prev"], g.real, g.imag, cot.real, cot.imag, x["g_init_re"], x["g_init_im"])
    return dict(zip(CORE_ARGS, kernel.scan_backward(numpy_launch(lib), np, *inputs, chunk)))


def torch_grads(x, cot):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: on a busy machine, extra threads made N = 4096 take minutes
    try:
        t = as_torch(x, grad=True)
        g = torch_green(t)
        (torch.tensor(cot.real) * g.real + torch.tensor(cot.imag) * g.imag).sum().backward()
        return {k: t[k].grad.numpy() for k in CORE_ARGS}
    finally:
        torch.set_num_threads(threads)


def cotangent(shape, seed=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


@pytest.mark.parametrize("n, chunk", [(1, 16), (7, 16), (16, 16), (257, 16), (257, 64), (257, 1024)])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_reference(cpu_kernels, n, chunk, with_state):
    x = core_inputs((2, n, 3), seed=n, with_state=with_state)
    g, expected = kernel_green(cpu_kernels, x, chunk), torch_green(as_torch(x)).numpy()
    assert relative(g, expected) < 2e-5
    assert deviation(complex_parts(g), complex_parts(expected))[1] < 1e-5


def test_long_sequence_is_bounded_and_matches(cpu_kernels):
    """N = 4096, strong potentials, eta down to 1e-3: the bounds of g hold and the gradients stay finite."""
    x = core_inputs((2, 4096, 6), seed=1, eta=(1e-3, 1e-2, 0.1, 1.0, 3e-3, 0.3), spread=4.0)
    g = kernel_green(cpu_kernels, x, kernel.default_chunk(4096))
    assert np.isfinite(g).all() and (g.imag > 0).all()
    assert (np.abs(g) * x["eta"] <= 1 + 1e-5).all()
    # As accurate as a sequential float32 loop (the ops scan: 3e-4): the chunk joins add no error of their own.
    expected = torch_green(as_torch(x)).numpy()
    assert relative(g, expected) < 1e-4
    assert deviation(complex_parts(g), complex_parts(expected))[1] < 2e-5
    cot = cotangent(g.shape)
    ours, expected = kernel_grads(cpu_kernels, x, cot, 64), torch_grads(x, cot)
    for name in CORE_ARGS:
        assert np.isfinite(ours[name]).all(), name
        # eta's gradient sums -Im(conj(lambda) g^2) over 4096 positions that largely cancel: 1.5e-4 as measured,
        # the same for one sequential chunk (3.4e-4 for the ops scan).
        assert deviation(ours[name], expected[name])[1] < (4e-4 if name == "eta" else 5e-5), name


def test_streams_exactly_and_chunking_changes_nothing(cpu_kernels):
    x = core_inputs((2, 100, 3), seed=2)
    whole = kernel_green(cpu_kernels, x, 100)
    assert relative(kernel_green(cpu_kernels, x, 16), whole) < 1e-5
    head = kernel_green(cpu_kernels, {**x, "a": x["a"][:, :37], "k_prev": x["k_prev"][:, :37]}, 16)
    state = {"g_init_re": head[:, -1].real.copy(), "g_init_im": head[:, -1].imag.copy()}
    tail = kernel_green(cpu_kernels, {**x, "a": x["a"][:, 37:], "k_prev": x["k_prev"][:, 37:], **state}, 16)
    assert relative(np.concatenate([head, tail], axis=1), whole) < 1e-5


@pytest.mark.parametrize("chunk", [2, 3, 8])
def test_chunk_joins_hold_a_fixed_point_at_small_eta(cpu_kernels, chunk):
    """A clean chain (a - E = 1, k = 1, eta = 1e-4) started at its fixed point g* stays there. From g = 0 the same
    map cycles 0 -> 1 -> ~1/eta: a chunk's reference run started at 0 would pass near that pole (error 8e-4 to
    4e-3); from g_ref = i it keeps within 2e-6."""
    eta = 1e-4
    alpha = 1 - 1j * eta
    fixed = (alpha + 1j * np.sqrt(4 - alpha**2)) / 2  # the root of g^2 - alpha g + 1 = 0 with Im g > 0
    x = dict(a=np.full((1, 64, 1), 2.0), k_prev=np.ones((1, 64, 1)), energy=[1.0], eta=[eta])
    x |= dict(g_init_re=[[fixed.real]], g_init_im=[[fixed.imag]])
    x = {k: np.asarray(v, dtype=np.float32) for k, v in x.items()}
    assert np.abs(kernel_green(cpu_kernels, x, chunk) - fixed).max() < 1e-5


@pytest.mark.parametrize(
    "n, eta, chunk", [(33, (0.05, 0.2, 0.8), 16), (300, (0.005, 0.05, 0.5), 16), (300, (0.005, 0.05, 0.5), 512)]
)
def test_gradients_match_reference(cpu_kernels, n, eta, chunk):
    x = core_inputs((2, n, 3), seed=3, eta=eta)
    cot = cotangent(x["a"].shape)
    ours, expected = kernel_grads(cpu_kernels, x, cot, chunk), torch_grads(x, cot)
    for name in CORE_ARGS:
        d, r = deviation(ours[name], expected[name])
        assert r < 1e-5, (name, d, r)


def test_gradient_of_the_last_position_crosses_every_chunk(cpu_kernels):
    """Weak scattering (long memory) and a loss on g_{N-1} alone: the early positions' gradients come only
    through the adjoint carried across each chunk boundary."""
    x = core_inputs((2, 48, 3), seed=6, eta=(1e-3, 3e-3, 1e-2), spread=0.1)
    cot = np.zeros(x["a"].shape, dtype=np.complex64)
    cot[:, -1] = cotangent((2, 3), seed=7)
    ours, expected = kernel_grads(cpu_kernels, x, cot, 8), torch_grads(x, cot)
    first_chunk = np.linalg.norm(expected["a"][:, :8]) / np.linalg.norm(expected["a"])
    assert first_chunk > 1e-2, first_chunk  # the test means something: the first chunk is reached
    for name in CORE_ARGS:
        d, r = deviation(ours[name], expected[name])
        assert r < 3e-5, (name, d, r)  # measured <= 8e-6 (g_init), 1e-6 with one chunk: 5 joins at eta = 1e-3


@pytest.mark.parametrize("energy_shape", [(3,), (1, 1, 3), ()])
def test_custom_function_matches_ops_fallback(cpu_kernels, energy_shape):
    """The mx.custom_function glue (forward, VJP, broadcast energy) with the compiled body behind it."""
    x = core_inputs((2, 70, 3), seed=5)
    energy = x["energy"].reshape(energy_shape) if energy_shape else x["energy"][0]
    primals = [mx.array(v) for v in (x["a"], x["k_prev"], energy, x["eta"], x["g_init_re"], x["g_init_im"])]
    cot = cotangent(x["a"].shape)
    cotangents = [mx.array(cot.real), mx.array(cot.imag)]
    launch = mlx_launch(cpu_kernels)

    def on_kernels(*p):
        return kernel.green_function_kernel(*p[:4], (p[4], p[5]), chunk=16, launch=launch)

    def on_ops(*p):
        return green_function(*p[:4], (p[4], p[5]), use_kernel=False)

    (g_re, g_im), grads = mx.vjp(on_kernels, primals, cotangents)
    (f_re, f_im), fallback = mx.vjp(on_ops, primals, cotangents)
    assert deviation(mx.stack([g_re, g_im]), mx.stack([f_re, f_im]))[1] < 2e-5
    for name, ours, theirs in zip(CORE_ARGS, grads, fallback):
        assert ours.shape == theirs.shape, name
        assert deviation(ours, theirs)[1] < 2e-5, name


def test_kernel_path_is_chosen_only_where_it_applies(monkeypatch):
    assert kernel._per_channel(mx.ones((1, 1, 4)), 4).shape == (4,)
    assert kernel._per_channel(mx.array(2.0), 4).shape == (4,)
    assert kernel._per_channel(mx.ones((2, 1, 4)), 4) is None
    a = mx.ones((1, 8, 4))
    on_gpu = kernel.available() is not None and mx.default_device() == mx.gpu
    monkeypatch.delenv("MLX_LTC_BK_KERNEL", raising=False)
    assert not kernel.applies(a, mx.ones(4), mx.ones(4))  # opt-in until run on a GPU
    monkeypatch.setenv("MLX_LTC_BK_KERNEL", "1")
    assert kernel.applies(a, mx.ones(4), mx.ones(4)) == on_gpu


def c_type(name):
    return "int32_t" if name == "dims" else "float"


def test_gpu_script_runs_on_the_cpu_body(cpu_kernels, monkeypatch, capsys):
    """scripts/run_bk_kernels_on_gpu.py's checks and timings, with the compiled CPU body standing in for the GPU."""
    spec = importlib.util.spec_from_file_location("run_bk_kernels_on_gpu", ROOT / "scripts/run_bk_kernels_on_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(
        kernel, "_gpu_green", lambda _, chunk: kernel.make_green_function(mlx_launch(cpu_kernels), chunk)
    )
    assert script.check(257, 16) and script.check(7, 0)
    assert "vs reference" in capsys.readouterr().out
    assert all(t > 0 for t in script.timing(1, 64, 4, 16, True))


def metal_unit(name, inputs, outputs, source):
    """A Metal kernel as MLX writes it (its signature, then the source), made C++ by the shims below."""
    params = [f"const device {c_type(n)}* {n} [[buffer({i})]]" for i, n in enumerate(inputs)]
    params += [f"device float* {n} [[buffer({len(inputs) + i})]]" for i, n in enumerate(outputs)]
    params += ["uint3 thread_position_in_grid [[thread_position_in_grid]]"] * ("thread_position_in_grid" in source)
    return f"[[kernel]] void {name}({', '.join(params)}) {{\n{source}}}\n"


def cuda_unit(name, inputs, outputs, source):
    params = [f"const {c_type(n)}* {n}" for n in inputs] + [f"float* {n}" for n in outputs]
    return f"__global__ void {name}({', '.join(params)}) {{\n{source}}}\n"


SHIMS = {
    "metal": ("#define device\n#define kernel\nstruct uint3 { unsigned x, y, z; };\n", metal_unit),
    "cuda": (
        "#define __device__\n#define __global__\nstruct dim3_ { unsigned x, y, z; };\n"
        "static dim3_ blockIdx, blockDim, threadIdx;\n",
        cuda_unit,
    ),
}


@needs_compiler
@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_gpu_sources_assemble(tmp_path, backend):
    """Each kernel's source is its prelude's thread index + exactly its part of the body, and the whole unit
    (header, MLX-style signatures, sources) parses as C++ once the backend's keywords are shimmed."""
    shims, unit = SHIMS[backend]
    header = kernel.assemble(backend, 0)
    assert "#define BK_FN" in header
    units = [shims, "#include <cstdint>", header]
    for name, (part, inputs, outputs) in kernel.KERNELS.items():
        source = kernel.assemble(backend, part)
        assert f"#define BK_PART {part}\n" in source and f"#elif BK_PART == {part}  // {name}:" in source
        assert ("thread_position_in_grid.x" if backend == "metal" else "blockIdx.x * blockDim.x") in source
        units.append(unit(name, inputs, outputs, source))
    path = tmp_path / "unit.cpp"
    path.write_text("\n".join(units))
    flags = ["-fsyntax-only", "-std=c++17", "-Wall", "-Wno-attributes", "-Werror"]
    subprocess.run([COMPILER, *flags, str(path)], check=True)
