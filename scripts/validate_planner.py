"""The planner's predicted peak next to MLX's measured one, for every cell `bench_memory.py` measured.

    python scripts/bench_memory.py --model tiny-starcoder2 --lens 1024,2048,4096,8192 \
        --impls plain,stock,chunked,efficient,engine,engine_sqrt --json tiny.json
    (and smollm2-135m; shape:starcoder2-3b --layers 1|2 --bits 0 --dtype fp32; tiny-starcoder2 --dtype bf16)
    python scripts/validate_planner.py tiny.json smol.json sc3b-*.json [--fit] [--json OUT] [--md OUT]

--fit prints the per-policy coefficients that make `hardware.planner.COEFFICIENTS` (and per policy a margin,
the smallest factor that leaves no cell under-predicted by more than 4%): for each policy, a max-affine fit
(the larger of its phases) by linear programming on the relative error. Then, with or without --fit, the
table of predicted vs measured with the error, and the StarCoder2-3B table.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlx_ltc.hardware import planner  # noqa: E402
from mlx_ltc.train.policies import POLICIES  # noqa: E402


def shape_and_setup(row: dict) -> tuple:
    """The planner's view of the model a bench_memory cell trained."""
    from bench_memory import SHAPES

    from mlx_ltc import models

    model = row["model"]
    if model.startswith("shape:"):
        config = dict(SHAPES[model.split(":", 1)[1]], num_hidden_layers=row["layers"])
        shape = planner.Shape.from_config(config, f"{model} ({row['layers']} layers)")
        return shape, planner.Setup(
            dtype=row["dtype"], bits=row.get("bits", 4), group_size=64, batch=row.get("batch", 1)
        )
    config = json.loads((models.resolve(model, models.default_cache_dir()) / "config.json").read_text())
    shape = planner.Shape.from_config(config, model)  # dequantized on a CPU
    return shape, planner.Setup(dtype=row["dtype"], bits=0, batch=row.get("batch", 1))


def cells(paths) -> list:
    out = []
    for path in paths:
        meta = json.loads(Path(path).read_text())
        for row in meta["rows"] if isinstance(meta, dict) else meta:
            if row.get("peak_bytes") and row["impl"] in POLICIES | {"ours": None}:
                row = dict(
                    row,
                    model=row.get("model") or (meta.get("model") if isinstance(meta, dict) else None),
                    impl=row["impl"].replace("ours", "engine"),
                )
                out.append((row, *shape_and_setup(row)))
    return out


def _design(policy, mine, phase):
    X, y = [], []
    for r, sh, st in mine:
        u = planner.units(sh, st, r["L"])
        base = planner.weights_bytes(sh, st) + planner.lora_bytes(sh, st)
        base += planner.kept_checkpoints(POLICIES[policy], sh) * u["layer"]
        X.append([u[n] / r["peak_bytes"] for n in phase])
        y.append((r["peak_bytes"] - base) / r["peak_bytes"])
    return np.array(X), np.array(y)


def _minimax(designs, y, assign):
    """Coefficients (>= 0) of every phase minimising t where, relative to each measured peak, the phase a cell is
    assigned to over-predicts by at most t and under-predicts by at most t/2, and no other phase exceeds it by
    more than t (so the assigned phase is the max). Linear programming (HiGHS)."""
    from scipy.optimize import linprog

    sizes = [X.shape[1] for X, _ in designs]
    n = sum(sizes) + 1  # the coefficients, then t
    rows, bounds = [], []
    for i in range(len(y)):
        for j, (X, _) in enumerate(designs):
            a = np.zeros(n)
            a[sum(sizes[:j]) : sum(sizes[: j + 1])] = X[i]
            rows.append(np.r_[a[:-1], -1.0])  # X c - y <= t
            bounds.append(y[i])
            if assign[i] == j:
                rows.append(np.r_[-a[:-1], -0.5])  # y - X c <= t / 2
                bounds.append(-y[i])
    cost = np.zeros(n)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=np.array(rows), b_ub=np.array(bounds), bounds=[(0, None)] * n, method="highs")
    if not res.success:
        return np.inf, None
    x = res.x
    return x[-1], [x[sum(sizes[:j]) : sum(sizes[: j + 1])] for j in range(len(designs))]


def _fit_phases(policy, mine) -> list:
    """Max-affine fit: each cell is explained by one phase (the loss, or a layer's backward), the larger one.
    Assignments tried: every split of the cells by the ratio of the phases' main units (each phase's last
    unit); for each, the minimax coefficients; the best overall."""
    phases = [list(p) for p in planner.COEFFICIENTS[policy]]
    designs = [_design(policy, mine, names) for names in phases]
    y = designs[0][1]
    if len(phases) == 1:
        splits = [np.zeros(len(mine), dtype=int)]
    else:
        order = np.argsort(designs[1][0][:, -1] / np.maximum(designs[0][0][:, -1], 1e-30))
        splits = []
        for k in range(len(mine) + 1):
            assign = np.ones(len(mine), dtype=int)
            assign[order[:k]] = 0
            splits.append(assign)
    best = min((_minimax(designs, y, a) for a in splits), key=lambda r: r[0])
    return [{n: round(float(v), 4) for n, v in zip(names, c)} for names, c in zip(phases, best[1])]


def fit(rows) -> tuple[dict, dict]:
    """Coefficients per policy on the fp32 cells; then for bf16/fp16 cells the loss side's factor per policy
    (the smallest worst error, none under-predicted by more than 4%); then per policy the smallest margin (>= 1)
    that leaves no cell under-predicted by more than 4%."""
    coefficients, margins = {}, {}
    for policy in planner.COEFFICIENTS:
        mine = [(r, sh, st) for r, sh, st in rows if r["impl"] == policy and st.dtype == "fp32"]
        coefficients[policy] = _fit_phases(policy, mine) if mine else planner.COEFFICIENTS[policy]
    planner.COEFFICIENTS.update(coefficients)
    planner.MARGIN.update({p: 1.0 for p in planner.MARGIN})
    for policy in planner.COEFFICIENTS:
        low = [(r, sh, st) for r, sh, st in rows if r["impl"] == policy and st.dtype != "fp32"]
        best = (np.inf, 1.0)
        for factor in np.arange(0.05, 5.0, 0.05):
            planner.LOW_PRECISION_LOSS[policy] = float(factor)
            errors = [predicted(r, sh, st) / r["peak_bytes"] - 1 for r, sh, st in low]
            if errors and min(errors) >= -0.04:
                best = min(best, (max(abs(e) for e in errors), round(float(factor), 2)))
        planner.LOW_PRECISION_LOSS[policy] = best[1]
    for policy in planner.COEFFICIENTS:
        errors = [predicted(r, sh, st) / r["peak_bytes"] - 1 for r, sh, st in rows if r["impl"] == policy]
        margins[policy] = round(max(1.0, (1 - 0.04) / (1 + min(errors))), 3) if errors else 1.0
    planner.MARGIN.update(margins)
    return coefficients, margins


def predicted(row, shape, setup) -> int:
    return planner.predict(shape, setup, row["impl"], row["L"])["peak"]


def headline(rows, budget: int, lens=(4096, 8192, 16384, 32768, 65536)) -> str:
    """StarCoder2-3B, 30 layers, 4-bit bf16 (a Mac's setup): predicted peaks per policy, the longest L in budget,
    and the measured per-layer increment (2 layers - 1 layer) next to the predicted one."""
    config = json.loads((Path(planner.__file__).parent.parent / "models/configs/starcoder2-3b.json").read_text())
    shape = planner.Shape.from_config(config, "bigcode/starcoder2-3b")
    setup = planner.Setup(dtype="bf16", bits=4, group_size=64, backend="metal")
    names = [n for n in POLICIES if n != "fused"]
    out = [f"StarCoder2-3B (30 layers), 4-bit bf16, LoRA rank 8, batch 1: peak GB, predicted from measured "
           f"per-layer terms; budget {budget / 1e9:.1f} GB", "",
           "| L | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    for L in lens:
        cells = []
        for n in names:
            peak = planner.predict(shape, setup, n, L)["peak"]
            cells.append(f"{peak / 1e9:.2f}" + ("" if peak <= budget else " (over)"))
        out.append(f"| {L:,} | " + " | ".join(cells) + " |")
    longest = {n: planner.max_seq_len(shape, setup, n, budget) for n in names}
    out.append("| longest L within budget | " + " | ".join(f"{longest[n]:,}" for n in names) + " |")
    by = {}
    for r, sh, st in rows:
        if r["model"].startswith("shape:"):
            by[(r["impl"], r["L"], st.dtype, r["layers"])] = (r["peak_bytes"], predicted(r, sh, st))
    pairs = sorted({k[:3] for k in by if k[3] == 1 and k[:3] + (2,) in by})
    if pairs:
        out += ["", "Per-layer increment, measured (2 layers - 1 layer) vs predicted, MB:", "",
                "| policy | dtype | L | measured | predicted |", "|---|---|---|---|---|"]  # fmt: skip
        for policy, L, dtype in pairs:
            (m1, p1), (m2, p2) = by[(policy, L, dtype, 1)], by[(policy, L, dtype, 2)]
            out.append(f"| {policy} | {dtype} | {L} | {(m2 - m1) / 1e6:.0f} | {(p2 - p1) / 1e6:.0f} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("measured", nargs="+", type=Path, help="bench_memory.py --json outputs")
    p.add_argument("--fit", action="store_true", help="fit the coefficients instead of checking them")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--budget", default="5.3GB", help="the headline table's budget")
    args = p.parse_args()
    rows = cells(args.measured)
    if args.fit:
        coefficients, margins = fit(rows)
        print("COEFFICIENTS = {\n" + "".join(f"    {k!r}: {v},\n" for k, v in coefficients.items()) + "}")
        print(f"LOW_PRECISION_LOSS = {planner.LOW_PRECISION_LOSS}")
        print(f"MARGIN = {margins}")
    table, worst, under = [], 0.0, 0.0
    lines = ["| model | dtype | policy | L | predicted GB | measured GB | error |", "|---|---|---|---|---|---|---|"]
    for r, sh, st in rows:
        pred = predicted(r, sh, st)
        err = pred / r["peak_bytes"] - 1
        worst, under = max(worst, abs(err)), min(under, err)
        table.append({"model": sh.name, "dtype": st.dtype, "policy": r["impl"], "L": r["L"], "batch": st.batch,
                      "predicted_bytes": pred, "measured_bytes": r["peak_bytes"], "error": err})  # fmt: skip
        lines.append(f"| {sh.name} | {st.dtype} | {r['impl']} | {r['L']} | {pred / 1e9:.3f} | "
                     f"{r['peak_bytes'] / 1e9:.3f} | {err:+.1%} |")  # fmt: skip
    summary = f"{len(rows)} cells: worst |error| {worst:.1%}, worst under-prediction {under:.1%}"
    print("\n".join(lines) + "\n\n" + summary)
    from mlx_ltc.hardware.profile import parse_size

    head = headline(rows, parse_size(args.budget))
    print("\n" + head)
    if args.json:
        doc = {"cells": table, "worst_error": worst, "worst_under": under, "coefficients": planner.COEFFICIENTS,
               "low_precision_loss": planner.LOW_PRECISION_LOSS, "margin": planner.MARGIN}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.md:
        args.md.write_text("\n".join(lines) + "\n\n" + summary + "\n\n" + head + "\n")


if __name__ == "__main__":
    main()
