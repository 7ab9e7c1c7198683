"""RLR's compiled ops (``riskfast._C``) against the alternatives, on the CPU.

Ops: ``perturb_``, ``accumulate_noise_`` (8 seeds), ``philox_normal`` and the
transition log-density (forward; forward + backward returning fresh gradients
(``torch.autograd.grad``); forward + backward adding into the leaves' ``.grad``, as a
training step does; the ``[B, T]`` step form). Columns
(``variant``):

* ``compiled`` - the op of ``riskfast._C`` (``backend="compiled"``);
* ``reference`` - the PyTorch reference it is tested against (``backend="reference"``);
* ``torch.compile(reference)`` - Inductor on ``transition_log_prob_reference``. Not
  for the noise ops: ``torch.compile(philox_normal_reference)`` did not finish
  compiling in 9 minutes here (torch 2.13, CPU), nor in 4-7 minutes for 4,096
  numbers with ``dynamic=False`` and ``constant_and_index_propagation=False`` or the
  realize thresholds at 1. Stack samples: ``GraphLowering.run_node`` asks
  ``should_realize_on_reuse`` / ``has_exceeded_max_reads``, which count the ops of the
  inlined pointwise body (``inner_fn_opcount``) by walking it as a tree, 45-57
  ``inner_fn`` calls deep (likely cause, not proven: the counters come from
  ``arange``, with no buffer reads, so the read-count rules never realize the rounds,
  and a walk that reads each word twice per round grows exponentially). That column
  is absent;
* ``by hand`` - what a user writes without riskfast: ``p.add_(torch.randn(p.shape,
  generator=g), alpha=s)`` per parameter (per seed, reseeding ``g``), ``torch.randn``
  for ``philox_normal``.

Sizes (``spec/kernels.md``, "Benchmark shapes"): the parameter lists of LoRA r = 4 on
the attention projections of SD 1.5's UNet (256 tensors, 797,184 parameters) and of
the full SD 1.5 UNet (686 tensors, 859,520,964 parameters; element counts recorded in
``sd15_param_numels.json`` from diffusers' ``UNet2DConditionModel`` on the meta
device); the reference column on the full
UNet would take minutes per call, so they run on ``unet/10``: the same 686 tensors
with a tenth of the elements each (85.95M). Latents ``(8, 4, 64, 64)`` and
``(8, 4, 128, 128)``, float32. ``copy`` is a large ``clone`` (2**26 float32, 256 MiB)
timed in the same run; every row's ``extra_info`` holds the bytes it must move
(each input read once, each output written once) and its rate as a fraction of that
copy bandwidth.

Run: ``.venv/bin/python -m pytest benchmarks/test_bench_rlr_ops.py --benchmark-only -s``
(about 10 minutes; ``-k lora`` or ``-k transition`` for parts). With ``-s`` the table of
medians and copy fractions recorded in ``benchmarks/RESULTS.md`` is printed at the end.
Times on a shared machine vary; the load average is printed with the table, and
``RISKFAST_BENCH_THREADS=1`` pins torch to one thread (with other jobs on the cores,
every parallel region waits for a descheduled thread, which punishes the reference's
many small ops far more than a single fused op).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from riskfast.ops import TransitionCoefficients, accumulate_noise_, philox_normal
from riskfast.ops.philox import philox_normal_reference
from riskfast.ops.transition import (
    _compiled_transition_op,
    transition_log_prob,
    transition_log_prob_into,
    transition_log_prob_reference,
)

COMPILED = _compiled_transition_op(torch.device("cpu")) is not None
if os.environ.get("RISKFAST_BENCH_THREADS"):  # e.g. 1 on a machine shared with other jobs
    torch.set_num_threads(int(os.environ["RISKFAST_BENCH_THREADS"]))
pytestmark = pytest.mark.skipif(not COMPILED, reason="riskfast._C is not built: nothing to time")

LATENTS = {"B=8 4x64x64": (8, 4, 64, 64), "B=8 4x128x128": (8, 4, 128, 128)}
SEEDS8 = list(range(100, 108))
SCALES8 = [0.01 * (s + 1) * (-1) ** s for s in range(8)]
COPY_NUMEL = 2**26
_ROWS: list[dict] = []


# ------------------------------------------------------------------ parameter lists
SD15_NUMELS = Path(__file__).with_name("sd15_param_numels.json")


@functools.cache
def sd15_numels() -> dict[str, list[int]]:
    """Element counts of SD 1.5's UNet parameters and of LoRA r=4 on its attention
    projections (recorded from diffusers on the meta device: see the file's "source")."""
    return json.loads(SD15_NUMELS.read_text())


def make_params(kind: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    numels = sd15_numels()
    if kind == "lora":
        sizes = numels["lora_r4_attention"]
    elif kind == "unet":
        sizes = numels["unet"]
    else:  # "unet/10": the UNet's tensor-size mix at a tenth of the elements
        sizes = [max(1, n // 10) for n in numels["unet"]]
    return [torch.full((n,), 0.5, dtype=dtype) for n in sizes]


# ------------------------------------------------------------------ alternatives
def by_hand_accumulate(tensors, seeds, scales) -> None:
    generator = torch.Generator()
    with torch.no_grad():
        for seed, scale in zip(seeds, scales, strict=True):
            generator.manual_seed(seed)
            for p in tensors:
                p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype), alpha=scale)


NOISE_VARIANTS: dict[str, Callable] = {
    "compiled": lambda ts, seeds, scales: accumulate_noise_(ts, seeds, scales, backend="compiled"),
    "reference": lambda ts, seeds, scales: accumulate_noise_(
        ts, seeds, scales, backend="reference"
    ),
    "by hand": by_hand_accumulate,
}


# ------------------------------------------------------------------ timing helpers
def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


_COPY: dict[str, float] = {}


def copy_bandwidth() -> float:
    """Bytes per second of a large clone (read + write): the ``copy`` row's median when it
    ran in this session, else a median of 5 clones after a warm-up."""
    if "bandwidth" not in _COPY:
        src = torch.randn(COPY_NUMEL)
        src.clone()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            src.clone()
            times.append(time.perf_counter() - start)
        _COPY["bandwidth"] = 2 * src.numel() * src.element_size() / statistics.median(times)
    return _COPY["bandwidth"]


def _record(benchmark, op: str, size: str, variant: str, nbytes: float) -> None:
    median = benchmark.stats.stats.median
    fraction = nbytes / median / copy_bandwidth()
    benchmark.extra_info.update({"bytes": nbytes, "copy_fraction": round(fraction, 3)})
    _ROWS.append(
        {"op": op, "size": size, "variant": variant, "ms": median * 1e3, "fraction": fraction}
    )


def _run(benchmark, fn: Callable[[], object], slow: bool) -> None:
    if slow:  # seconds per call: a few rounds, no calibration
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(fn)


@pytest.fixture(scope="module", autouse=True)
def _print_table():
    yield
    if not _ROWS:
        return
    caption = (
        f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {_load()}; "
        f"copy bandwidth (clone of {COPY_NUMEL * 4 / 2**20:.0f} MiB) "
        f"{copy_bandwidth() / 1e9:.2f} GB/s"
    )
    lines = [
        caption,
        "| op | size | variant | median ms | fraction of copy bandwidth |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in _ROWS:
        lines.append(
            f"| {r['op']} | {r['size']} | {r['variant']} | {r['ms']:.3f} | {r['fraction']:.3f} |"
        )
    print("\n".join(lines))


# ------------------------------------------------------------------ benchmarks
def test_copy_bandwidth(benchmark):
    src = torch.randn(COPY_NUMEL)
    benchmark.pedantic(src.clone, rounds=5, iterations=1, warmup_rounds=1)
    _COPY["bandwidth"] = 2 * src.numel() * 4 / benchmark.stats.stats.median
    _record(benchmark, "copy (clone)", "2**26 fp32", "torch", 2 * src.numel() * 4)


@pytest.mark.parametrize("variant", list(NOISE_VARIANTS))
@pytest.mark.parametrize("kind", ["lora", "unet/10", "unet"])
@pytest.mark.parametrize("seeds", [1, 8], ids=["perturb_", "accumulate_noise_ x8"])
def test_noise(benchmark, variant, kind, seeds):
    if kind == "unet" and variant == "reference":
        pytest.skip("minutes per call on the full UNet: timed on unet/10 (same tensor mix)")
    params = make_params(kind)
    numel = sum(p.numel() for p in params)
    seed_list, scales = (SEEDS8, SCALES8) if seeds == 8 else ([7], [1e-3])
    fn = NOISE_VARIANTS[variant]
    op = "perturb_" if seeds == 1 else "accumulate_noise_ (8 seeds)"
    _run(benchmark, lambda: fn(params, seed_list, scales), slow=kind != "lora")
    _record(
        benchmark, op, f"{kind} ({len(params)} tensors, {numel / 1e6:.2f}M)", variant, 8 * numel
    )


@pytest.mark.parametrize("variant", ["compiled", "reference", "by hand (torch.randn)"])
def test_philox_normal(benchmark, variant):
    n = 2**24
    if variant == "compiled":
        fn = functools.partial(philox_normal, n, 5, backend="compiled")
    elif variant == "reference":
        fn = functools.partial(philox_normal_reference, n, 5)
    else:
        generator = torch.Generator().manual_seed(5)
        fn = functools.partial(torch.randn, n, generator=generator)
    _run(benchmark, fn, slow=variant == "reference")
    _record(benchmark, "philox_normal", "2**24 fp32", variant, 4 * n)


def _transition_case(shape, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(shape, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)
    ]
    a_t, a_prev = 0.5, 0.6
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    coefficients = TransitionCoefficients(
        a_t, a_prev**0.5, (1 - a_prev - sigma**2) ** 0.5, 0.0, sigma
    )
    return inputs, coefficients


_compiled_reference_transition = torch.compile(transition_log_prob_reference, dynamic=False)


def _transition_forward(variant):
    if variant == "torch.compile(reference)":
        return lambda x_prev, x_t, out, c: _compiled_reference_transition(x_prev, x_t, out, c)[0]
    return lambda x_prev, x_t, out, c: transition_log_prob(x_prev, x_t, out, c, backend=variant)


TRANSITION_VARIANTS = ["compiled", "reference", "torch.compile(reference)"]


@pytest.mark.parametrize("variant", TRANSITION_VARIANTS)
@pytest.mark.parametrize("shape", list(LATENTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transition_forward(benchmark, variant, shape, dtype):
    inputs, coefficients = _transition_case(LATENTS[shape], dtype)
    forward = _transition_forward(variant)
    with torch.no_grad():
        forward(*inputs, coefficients)  # compile / warm up
        benchmark(lambda: forward(*inputs, coefficients))
    nbytes = 3 * inputs[0].numel() * inputs[0].element_size()
    _record(benchmark, "transition log-prob fwd", f"{shape} {str(dtype)[6:]}", variant, nbytes)


@pytest.mark.parametrize("variant", TRANSITION_VARIANTS)
@pytest.mark.parametrize("shape", list(LATENTS))
def test_transition_forward_backward(benchmark, variant, shape):
    inputs, coefficients = _transition_case(LATENTS[shape], requires_grad=True)
    forward = _transition_forward(variant)
    weights = torch.randn(LATENTS[shape][0])

    def step():
        return torch.autograd.grad((forward(*inputs, coefficients) * weights).sum(), inputs)

    step()
    benchmark(step)
    # forward reads 3 tensors; backward reads 3 and writes 3 gradients
    nbytes = 9 * inputs[0].numel() * 4
    _record(benchmark, "transition log-prob fwd+bwd", f"{shape} fp32", variant, nbytes)


@pytest.mark.parametrize("variant", TRANSITION_VARIANTS)
@pytest.mark.parametrize("shape", list(LATENTS))
def test_transition_forward_backward_into_grad(benchmark, variant, shape):
    """The training pattern: ``loss.backward()`` adds the gradients into the leaves'
    ``.grad`` across iterations (the row above returns fresh gradients each time)."""
    inputs, coefficients = _transition_case(LATENTS[shape], requires_grad=True)
    forward = _transition_forward(variant)
    weights = torch.randn(LATENTS[shape][0])

    def step():
        (forward(*inputs, coefficients) * weights).sum().backward()

    step()
    benchmark(step)
    # as above, plus reading and writing the three .grad tensors it adds into
    nbytes = 15 * inputs[0].numel() * 4
    _record(benchmark, "transition log-prob fwd+bwd, into .grad", f"{shape} fp32", variant, nbytes)


@pytest.mark.parametrize("variant", ["compiled", "reference"])
@pytest.mark.parametrize("shape", list(LATENTS))
def test_transition_step_form(benchmark, variant, shape):
    inputs, coefficients = _transition_case(LATENTS[shape])
    log_probs = torch.zeros(LATENTS[shape][0], 50)
    benchmark(
        lambda: transition_log_prob_into(log_probs, 7, *inputs, coefficients, backend=variant)
    )
    _record(
        benchmark,
        "transition_log_prob_into ([B, 50] buffer)",
        f"{shape} fp32",
        variant,
        3 * inputs[0].numel() * 4,
    )
