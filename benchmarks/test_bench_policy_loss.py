"""pytest-benchmark suite: the clipped policy loss from hidden states, four ways (CPU).

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_policy_loss.py --benchmark-only -s``
(``RISKFAST_BENCH_THREADS=1`` pins torch to one thread, ``RISKFAST_BENCH_ROUNDS`` sets
the rounds, default 3). Issue 15.

Forward + backward of RiskPO's clipped surrogate (token-mean, ``eps = 0.2``, no KL, no
entropy bonus) on ``N = B x T`` response tokens whose log-probs come from
``hidden[B, T, H] @ weight[V, H].T``, fp32, every token a response token:

* ``dense``: the plain PyTorch loss, ``[N, V]`` logits, ``log_softmax``, gather,
  :func:`riskfast.riskpo.policy_loss`, autograd (``3 N H V`` multiply-adds);
* ``riskfast unfused``: :func:`riskfast.ops.fused_linear_logprobs` (chunked, backward
  recomputes the logits) then :func:`~riskfast.riskpo.policy_loss` (``4 N H V``);
* ``riskfast fused``: :func:`riskfast.ops.fused_linear_policy_loss`, gradients in the
  forward's chunked pass (``3 N H V``; the CPU path, ``backend="torch"``);
* ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``compiled=False``: its
  chunked PyTorch loss, one response per chunk; ``loss_type="dapo"``, the token mean,
  ``beta=0``), with the same importance-sampling level.

Shapes: issue 15's table (``B x T = 8 x 128``, ``H = 1,024``, ``V = 32,000``) and the
first fused linear shape of ``spec/kernels.md`` with ``N`` divided by 16 (``2 x 128``,
``H = 2,048``, ``V = 32,000``); the second (``4 x 128``, ``H = 4,096``, ``V = 128,256``)
only with ``RISKFAST_BENCH_LARGE=1``. Each with the token ratio (the issue's table) and
the sequence ratio.

The machine is shared, so the variants are timed **interleaved in one process**: one
test per shape and ratio runs ``rounds`` rounds, each timing every variant once (the
order rotates between rounds); the benchmark's own row is the time of a whole round,
and ``extra_info`` holds each variant's median and its ratio to ``dense``, printed
with ``-s``, its median CPU time (``time.process_time``: with one thread, the time the
process actually ran, less sensitive to other jobs than the wall clock), and the median
over rounds of the ratio to ``dense`` *within* a round
(variants timed next to each other share the machine's load), beside its peak extra
memory, measured in fresh subprocesses per variant (``VmHWM`` reset through
``/proc/self/clear_refs``, minus ``VmRSS`` just before the call, inputs built; the
median of three processes). The
peak includes the gradients ``grad_hidden`` and ``grad_weight`` every variant returns
(``4 (N H + V H)`` bytes); the working memory is the peak without them.
The load average before and after is recorded too. The loss values of the four
variants are checked to agree before anything is timed.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("RISKFAST_BENCH_THREADS"):  # e.g. 1 on a machine shared with other jobs
    torch.set_num_threads(int(os.environ["RISKFAST_BENCH_THREADS"]))

SHAPES = {  # label: (B responses, T tokens each, H, V)
    "N=1024 H=1024 V=32000": (8, 128, 1024, 32000),
    "N=256 H=2048 V=32000": (2, 128, 2048, 32000),
}
if os.environ.get("RISKFAST_BENCH_LARGE"):  # about 2 GiB of weight, minutes per step here
    SHAPES["N=512 H=4096 V=128256"] = (4, 128, 4096, 128256)
LEVELS = ("token", "sequence")
VARIANTS = ("dense", "riskfast unfused", "riskfast fused", "liger")


def make_inputs(shape: tuple[int, int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Leaves ``hidden``, ``weight`` (requiring grad) and the loss's other inputs.

    ``old_logp`` is the current log-prob plus noise of scale 0.1, so that ratios differ
    from 1 and some tokens are clipped, as after a first optimiser step.
    """
    from riskfast.ops import fused_linear_logprobs

    b, t, h, v = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * h**-0.5 * 2
    targets = torch.randint(0, v, (b, t), generator=gen)
    with torch.no_grad():
        logp = fused_linear_logprobs(hidden.reshape(b * t, h), weight, targets.reshape(-1))
    old_logp = logp.view(b, t) + 0.1 * torch.randn(b, t, generator=gen)
    return {
        "hidden": hidden.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "targets": targets,
        "old_logp": old_logp,
        "advantages": torch.randn(b, generator=gen),
        "mask": torch.ones(b, t, dtype=torch.bool),
    }


def make_variant(name: str, x: dict[str, torch.Tensor], level: str):
    """A function computing the variant's loss (a 0-dim tensor) from the inputs ``x``."""
    from riskfast.ops import fused_linear_logprobs, fused_linear_policy_loss
    from riskfast.riskpo import policy_loss

    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    old_logp, advantages, mask = x["old_logp"], x["advantages"], x["mask"]
    b, t, h = hidden.shape
    options = {"ratio_level": level, "eps_low": 0.2, "eps_high": 0.2, "agg": "token-mean"}
    if name == "dense":

        def loss():
            logits = hidden.reshape(b * t, h) @ weight.T
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets.reshape(-1, 1))
            return policy_loss(logp.view(b, t), old_logp, advantages, mask, **options)[0]

    elif name == "riskfast unfused":

        def loss():
            logp = fused_linear_logprobs(hidden.reshape(b * t, h), weight, targets.reshape(-1))
            return policy_loss(logp.view(b, t), old_logp, advantages, mask, **options)[0]

    elif name == "riskfast fused":

        def loss():
            return fused_linear_policy_loss(
                hidden, weight, targets, old_logp, advantages, mask, backend="torch", **options
            )[0]

    elif name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(
            beta=0.0, compiled=False, use_ref_model=False, chunk_size=1, epsilon_low=0.2,
            epsilon_high=0.2, loss_type="dapo", importance_sampling_level=level,
        )  # fmt: skip

        def loss():
            return module(
                hidden, weight, targets, mask.long(), advantages, old_per_token_logps=old_logp
            )[0]

    else:
        raise ValueError(f"variant: unknown {name!r}")
    return loss


def _step(x: dict[str, torch.Tensor], loss_fn) -> float:
    x["hidden"].grad = x["weight"].grad = None
    loss = loss_fn()
    loss.backward()
    return float(loss.detach())


def _load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------ fresh-process peak


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _child(variant: str, label: str, level: str) -> None:
    """Peak extra memory of one forward + backward, in this fresh process (stdout JSON)."""
    x = make_inputs(SHAPES[label])
    loss_fn = make_variant(variant, x, level)
    try:  # reset the peak to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_bytes("VmRSS")
    _step(x, loss_fn)
    peak = _status_bytes("VmHWM") - before
    grads = x["hidden"].grad.nbytes + x["weight"].grad.nbytes
    print(json.dumps({"peak_extra": peak, "gradients": grads}))


def peak_extra_mib(variant: str, label: str, level: str) -> tuple[float, float]:
    """``(peak extra, peak extra - the returned gradients)`` in MiB: the median over
    ``RISKFAST_BENCH_PEAK_RUNS`` (default 3) fresh processes, since glibc's reuse of
    freed heap memory moves a single process's resident peak by tens of MiB."""
    runs = [_peak_once(variant, label, level)
            for _ in range(int(os.environ.get("RISKFAST_BENCH_PEAK_RUNS", "3")))]  # fmt: skip
    peak = statistics.median(r[0] for r in runs)
    return peak, peak - runs[0][1]


def _peak_once(variant: str, label: str, level: str) -> tuple[float, float]:
    """``(peak extra, gradients)`` in MiB from one fresh process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--peak", variant, label, level],
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["peak_extra"] / 2**20, out["gradients"] / 2**20


# ------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("label", list(SHAPES))
def test_bench_policy_loss_fwd_bwd_interleaved(benchmark, label: str, level: str) -> None:
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (bench extra)")
    if not sys.platform.startswith("linux"):
        pytest.skip("the peak memory is read from /proc/self/status (Linux)")
    shape = SHAPES[label]
    x = make_inputs(shape)
    fns = {name: make_variant(name, x, level) for name in VARIANTS}
    values = {name: _step(x, fn) for name, fn in fns.items()}  # also the warm-up
    for name, value in values.items():
        assert abs(value - values["dense"]) <= 1e-4 * max(1.0, abs(values["dense"])), values
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)

    def one_round() -> None:
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(x, fns[name])
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        order.append(order.pop(0))  # rotate: no variant always runs first

    load_before = _load()
    rounds = int(os.environ.get("RISKFAST_BENCH_ROUNDS", "3"))
    benchmark.group = f"policy loss fwd+bwd {label} {level} ratio fp32 (CPU)"
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    load_after = _load()
    fns.clear()  # free the inputs before the subprocesses measure memory
    x.clear()
    dense = statistics.median(times["dense"])
    # the ratio to dense within each round (neighbours in time share the machine's load)
    ratios = {
        name: statistics.median(t / d for t, d in zip(times[name], times["dense"]))
        for name in VARIANTS
    }
    info = benchmark.extra_info
    info.update(load_before=load_before, load_after=load_after,
                threads=torch.get_num_threads(), rounds=rounds)  # fmt: skip
    header = (
        f"\n[{label}, {level} ratio] load {load_before:.1f} -> {load_after:.1f}, "
        f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds"
    )
    lines = [header]
    for name in VARIANTS:
        median = statistics.median(times[name])
        cpu_median = statistics.median(cpu[name])
        peak, working = peak_extra_mib(name, label, level)
        info[f"{name}: median_s"] = round(median, 4)
        info[f"{name}: cpu_median_s"] = round(cpu_median, 4)
        info[f"{name}: cpu_vs_dense"] = round(cpu_median / statistics.median(cpu["dense"]), 3)
        info[f"{name}: vs_dense"] = round(median / dense, 3)
        info[f"{name}: vs_dense_per_round"] = round(ratios[name], 3)
        info[f"{name}: peak_extra_MiB"] = round(peak, 1)
        info[f"{name}: working_MiB"] = round(working, 1)
        lines.append(
            f"  {name:17s} {median:8.3f} s  ({median / dense:.2f}x dense, per round "
            f"{ratios[name]:.2f}x)  CPU time {cpu_median:7.3f} s "
            f"({info[f'{name}: cpu_vs_dense']:.2f}x)  peak extra {peak:6.0f} MiB, without "
            f"the gradients {working:6.0f} MiB  all {[round(s, 3) for s in times[name]]}"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak":
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --peak VARIANT SHAPE LEVEL")
