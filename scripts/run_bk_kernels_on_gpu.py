"""The BK kernels on this machine's GPU (CUDA, or Metal): kernel vs the MLX ops fallback vs the torch float64
reference, then forward and forward+backward times against N.

    python scripts/run_bk_kernels_on_gpu.py [--lengths 1024,4096,16384,65536,131072] [--batch 4]
                                            [--channels 256] [--chunks 0,64,256] [--fallback-up-to 16384]

Needs MLX with a GPU backend (mlx[cuda] on Linux); torch for the reference rows (skipped without it). Exits 1
when a check misses its tolerance. Not yet run on a GPU: tests/test_bk_kernels.py runs its checks and timings
with the CPU-compiled kernel body standing in.
"""

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_ltc.research.bk import kernel
from mlx_ltc.research.bk.core import green_function

ARGS = ("a", "k_prev", "energy", "eta", "g_init_re", "g_init_im")


def inputs(b, n, c, seed=0, eta=(1e-3, 1e-2, 0.1, 1.0)):
    rng = np.random.default_rng(seed)
    g_init = 1 / (rng.normal(2, 1, (b, c)) - 2 - 1j * np.resize(eta, c))
    x = dict(a=rng.normal(2, 2, (b, n, c)), k_prev=rng.uniform(0.2, 2, (b, n, c)), energy=rng.uniform(0, 4, c))
    x.update(eta=np.resize(eta, c), g_init_re=g_init.real, g_init_im=g_init.imag)
    return {k: v.astype(np.float32) for k, v in x.items()}


def green_of(use_kernel, chunk=0):
    def green(*p):
        if use_kernel:
            return kernel.green_function_kernel(*p[:4], (p[4], p[5]), chunk=chunk or None)
        return green_function(*p[:4], (p[4], p[5]), use_kernel=False)

    return green


def vjp(x, cot, use_kernel, chunk=0):
    primals, cotangents = [mx.array(x[k]) for k in ARGS], [mx.array(cot.real), mx.array(cot.imag)]
    (g_re, g_im), grads = mx.vjp(green_of(use_kernel, chunk), primals, cotangents)
    return np.array(g_re) + 1j * np.array(g_im), dict(zip(ARGS, (np.array(v) for v in grads)))


def rel(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def check(n, chunk) -> bool:
    x = inputs(2, n, 8, seed=n)
    rng = np.random.default_rng(1)
    cot = rng.normal(size=(2, n, 8)) + 1j * rng.normal(size=(2, n, 8))
    g, grads = vjp(x, cot, True, chunk)
    rows = {"fallback": vjp(x, cot, False)}
    try:
        import torch

        from mlx_ltc.reference import bk as ref

        t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in x.items()}
        tg = ref.green(t["a"], t["k_prev"], t["energy"], t["eta"], torch.complex(t["g_init_re"], t["g_init_im"]))
        (torch.tensor(cot.real) * tg.real + torch.tensor(cot.imag) * tg.imag).sum().backward()
        rows["reference"] = (tg.detach().numpy(), {k: t[k].grad.numpy() for k in ARGS})
    except ImportError:
        print("  (no torch: reference rows skipped)")
    ok = True
    for name, (g_other, grads_other) in rows.items():
        devs = {"g": rel(g, g_other), **{k: rel(grads[k], grads_other[k]) for k in ARGS}}
        good = devs["g"] < 1e-4 and all(v < (1e-3 if k == "eta" else 2e-4) for k, v in devs.items() if k != "g")
        ok &= good
        listed = " ".join(f"{k} {v:.1e}" for k, v in devs.items())
        print(f"  N={n} chunk={chunk or kernel.default_chunk(n)} vs {name}: {listed}" + ("" if good else "  FAIL"))
    return ok


def seconds(fn, repeat=3):
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timing(b, n, c, chunk, use_kernel):
    x = {k: mx.array(v) for k, v in inputs(b, n, c).items()}
    primals, cot, green = [x[k] for k in ARGS], [mx.ones_like(x["a"])] * 2, green_of(use_kernel, chunk)
    return seconds(lambda: green(*primals)), seconds(lambda: mx.vjp(green, primals, cot))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384,65536,131072")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--chunks", default="0,64,256", help="chunk lengths; 0: default_chunk(N)")
    parser.add_argument("--fallback-up-to", type=int, default=16384)
    args = parser.parse_args()
    backend = kernel.available()
    if backend is None:
        sys.exit("no Metal or CUDA backend in this MLX build")
    print(f"backend {backend}, MLX {mx.__version__}, default device {mx.default_device()}")
    chunks = [int(c) for c in args.chunks.split(",")]
    ok = all([check(n, chunk) for n in (7, 257, 4096) for chunk in chunks])
    print("milliseconds, median of 3:")
    print(f"{'N':>7} {'chunk':>6} {'kernel fwd':>11} {'fwd+bwd':>9} {'ops fwd':>9} {'fwd+bwd':>9}")
    for n in (int(v) for v in args.lengths.split(",")):
        ops = timing(args.batch, n, args.channels, 0, False) if n <= args.fallback_up_to else (float("nan"),) * 2
        for chunk in chunks:
            fwd, both = timing(args.batch, n, args.channels, chunk, True)
            label = chunk or kernel.default_chunk(n)
            print(f"{n:>7} {label:>6} {fwd * 1e3:>11.2f} {both * 1e3:>9.2f} {ops[0] * 1e3:>9.2f} {ops[1] * 1e3:>9.2f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
