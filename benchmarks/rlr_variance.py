"""Variance of the RLR estimators and their baselines at equal model evaluations.

Spec ``rlr.md``, "Claims to verify": the paper proves FO <= ZO and HO <= ZO in variance
under its assumptions; this measures, whichever way it comes out, on the spec's test
setting (``tests/rlr_toy.py``: float64 2-D toy denoiser, DDIM T = 10, eta = 1,
trailing spacing, reward ``-||x_0 - c||^2``, K = 1).

For each estimator, ``calls`` independent calls of ``estimate_grad`` with ``starts``
starting points each (a ZO estimator runs each start as an antithetic pair). Columns:

* ``evals``: denoiser evaluations per call (samples; recomputation included);
* ``bias``: ``(mean - g) . g / |g|^2`` with ``g`` a long full-backprop run (percent;
  its own noise is about ``se``);
* ``var/coord``: the per-call variance averaged over coordinates;
* ``var along g``: the per-call variance of the projection on ``g / |g|``;
* ``x evals, rel. full``: ``var/coord * evals`` divided by the same for ``full``: the
  variance at an equal budget of model evaluations (averaging m calls costs m evals
  and divides the variance by m), relative to full backprop.

Run: ``.venv/bin/python benchmarks/rlr_variance.py [--calls 256] [--starts 64]``
(about 2 minutes on 2 CPU cores); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import rlr_toy

from riskfast.rlr import RLRConfig, estimate_grad

ESTIMATORS = {
    "rlr rest=zo h=1": RLRConfig(rest="zo", window=1),
    "rlr rest=zo h=2": RLRConfig(rest="zo", window=2),
    "rlr rest=zo h=4": RLRConfig(rest="zo", window=4),
    "rlr rest=lr h=1": RLRConfig(rest="lr", window=1),
    "rlr rest=lr h=2": RLRConfig(rest="lr", window=2),
    "rlr rest=lr h=4": RLRConfig(rest="lr", window=4),
    "rlr rest=none h=2 (biased)": RLRConfig(rest="none", window=2),
    "ddpo (pure likelihood ratio)": RLRConfig(estimator="ddpo"),
    "zo (ZO only)": RLRConfig(estimator="zo"),
    "draft K=1 (biased)": RLRConfig(estimator="draft", fo_steps=1),
    "alignprop (biased)": RLRConfig(estimator="alignprop"),
    "full": RLRConfig(estimator="full"),
}


def measure(model, scheduler, config, calls, starts, seed):
    grads, evals = [], 0
    start = time.perf_counter()
    for c in range(calls):
        generator = torch.Generator().manual_seed(seed * 100003 + c)
        x_T = torch.randn(starts, 2, generator=generator, dtype=torch.float64)
        model.zero_grad(set_to_none=True)
        metrics = estimate_grad(
            model, scheduler, rlr_toy.reward, x_T, config=config, generator=generator
        )
        grads.append(rlr_toy.flat_grad(model))
        evals += metrics["model_evaluations"]
    return torch.stack(grads), evals / calls, (time.perf_counter() - start) / calls


def variance_table(calls: int, starts: int, reference_calls: int, seed: int = 11):
    """Rows of the table (dicts); ``g`` from ``reference_calls`` full-backprop calls."""
    model = rlr_toy.pretrained_denoiser()
    scheduler = rlr_toy.scheduler()
    reference, _, _ = measure(
        model, scheduler, RLRConfig(estimator="full"), reference_calls, starts, seed + 1
    )
    g = reference.mean(0)
    g_unit = g / g.norm()
    rows = []
    for name, config in ESTIMATORS.items():
        grads, evals, seconds = measure(model, scheduler, config, calls, starts, seed)
        mean = grads.mean(0)
        along = grads @ g_unit
        rows.append(
            {
                "estimator": name,
                "evals": evals,
                "bias_percent": 100 * float((mean - g) @ g) / float(g @ g),
                "bias_se_percent": 100 * float(along.std()) / math.sqrt(calls) / float(g.norm()),
                "var_coord": float(grads.var(0).mean()),
                "var_along": float(along.var()),
                "seconds_per_call": seconds,
            }
        )
    full = next(r for r in rows if r["estimator"] == "full")
    for row in rows:
        row["budget_rel_full"] = (
            row["var_coord"] * row["evals"] / (full["var_coord"] * full["evals"])
        )
    return rows, float(g.norm())


def markdown(rows, g_norm, calls, starts) -> str:
    lines = [
        f"{calls} calls x {starts} starts per estimator; |g| = {g_norm:.3f}",
        "",
        (
            "| estimator | evals/call | bias (% of abs g) | var/coord | var along g "
            "| var x evals, rel. full | ms/call |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['estimator']} | {r['evals']:.0f} | {r['bias_percent']:+.1f} +- "
            f"{r['bias_se_percent']:.1f} | {r['var_coord']:.3g} | {r['var_along']:.3g} | "
            f"{r['budget_rel_full']:.3g} | {1000 * r['seconds_per_call']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--starts", type=int, default=64)
    parser.add_argument("--reference-calls", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="8 calls x 8 starts (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.starts, args.reference_calls = 8, 8, 8
    torch.set_num_threads(1)
    rows, g_norm = variance_table(args.calls, args.starts, args.reference_calls)
    print(markdown(rows, g_norm, args.calls, args.starts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
