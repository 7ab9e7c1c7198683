"""Counter-based noise: the PyTorch reference against the oracle, the compiled ops against
the reference, the stream's statistics, and bad input.

Claims checked here (spec ``rlr.md``, counter-based noise; the stream is defined in
``riskfast.ops.philox``):

* the reference's Philox4x32-10 reproduces Random123's known answers, and its normals
  agree with the pure-Python float64 oracle (``tests/oracles/philox_oracle.py``) to
  within 3 float32 ulps (measured: at most 2 on 60k numbers; the reference's float32
  log/sqrt/sin/cos round, the oracle's float64 ones barely);
* the compiled CPU ops of ``riskfast._C`` give the reference's stream **bitwise** (same
  float32 math functions, exact Philox and uniforms), for every dtype, seeds above
  2**32, offsets across the 2**32-block boundary of the counter's low word, lists split
  anyhow, and any thread count;
* ``perturb_(-scale)`` undoes ``perturb_(scale)`` to within one rounding each way;
* bad input raises ``ValueError``/``TypeError`` naming the argument before any write;
* moments and correlations of the stream are those of independent N(0, 1) numbers,
  within the stated intervals (about 5 standard errors).
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from oracles.philox_oracle import KNOWN_ANSWERS, normal, philox

from riskfast.ops import accumulate_noise_, perturb_, philox_normal
from riskfast.ops.noise import _compiled_noise_ops
from riskfast.ops.philox import (
    accumulate_noise_reference_,
    philox4x32,
    philox_normal_reference,
)

FLOATING = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
COMPILED = _compiled_noise_ops(torch.device("cpu")) is not None
needs_compiled = pytest.mark.skipif(
    not COMPILED, reason="riskfast._C has no CPU noise ops (extension missing; see riskfast info)"
)
# Seeds and offsets that exercise both key words and the carry of the block counter's
# low word (offset 4 * (2**32 - 5) starts five blocks before it wraps).
STREAMS = [(0, 0), (7, 3), (2**32 + 11, 4097), (2**63 - 1, 4 * (2**32 - 5) + 2)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (tests that vary it set their own): on a shared 2-core machine
    two spinning threads per process oversubscribe the cores and a 10 ms op takes 10 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in float32 ulps (same-sign values; bit patterns as ordered integers)."""
    return (a.float().view(torch.int32).long() - b.float().view(torch.int32).long()).abs()


# ---------------------------------------------------------------- reference vs oracle
def test_reference_philox_reproduces_random123_known_answers():
    for counter, key, expected in KNOWN_ANSWERS:
        words = philox4x32([torch.tensor([c], dtype=torch.int64) for c in counter], key)
        assert tuple(int(w) for w in words) == expected
        assert philox(counter, key) == expected  # the oracle itself


@pytest.mark.parametrize(("seed", "offset"), STREAMS)
def test_reference_stream_matches_the_float64_oracle_within_3_ulps(seed, offset):
    n = 2000
    ref = philox_normal_reference(n, seed, offset)
    oracle = torch.tensor([normal(offset + k, seed) for k in range(n)], dtype=torch.float64)
    assert _ulps(ref, oracle.float()).max() <= 3
    assert ((ref.double() - oracle).abs() <= 2.0**-21 * oracle.abs()).all()


def test_reference_element_layout_is_lane_n_mod_4_of_block_n_div_4():
    # element n of the stream does not depend on where a request starts
    full = philox_normal_reference(64, 5)
    for offset in (0, 1, 2, 3, 17):
        assert torch.equal(philox_normal_reference(64 - offset, 5, offset), full[offset:])


# ------------------------------------------------------------- compiled vs reference
@needs_compiled
@pytest.mark.parametrize(("seed", "offset"), STREAMS)
@pytest.mark.parametrize("numel", [1, 5, 4096 * 3 + 7])
def test_compiled_philox_normal_is_bitwise_the_reference(seed, offset, numel):
    compiled = philox_normal(numel, seed, offset, backend="compiled")
    assert torch.equal(compiled, philox_normal_reference(numel, seed, offset))


@needs_compiled
@pytest.mark.parametrize("dtype", FLOATING)
def test_compiled_philox_normal_casts_like_the_reference(dtype):
    compiled = philox_normal(1001, 3, 2, dtype=dtype, backend="compiled")
    assert compiled.dtype == dtype
    assert torch.equal(compiled, philox_normal_reference(1001, 3, 2, dtype=dtype))


def _parameter_list(seed: int) -> list[torch.Tensor]:
    """Tensors of every dtype and awkward sizes (a stream boundary mid-block, empties)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [
        ((3, 5), torch.float32),
        ((0,), torch.float32),
        ((4099,), torch.bfloat16),
        ((17, 3), torch.float64),
        ((5000,), torch.float16),
        ((2, 2), torch.float32),
    ]
    return [torch.randn(shape, generator=g).to(dtype) for shape, dtype in shapes]


@needs_compiled
def test_compiled_accumulate_noise_is_bitwise_the_reference_for_every_dtype():
    seeds, scales = [1, 2**40 + 1, 3], [0.1, -0.37, 1e-3]
    compiled, reference = _parameter_list(0), _parameter_list(0)
    accumulate_noise_(compiled, seeds, scales, backend="compiled")
    accumulate_noise_reference_(reference, seeds, scales)
    for c, r in zip(compiled, reference, strict=True):
        assert torch.equal(c, r)


@needs_compiled
def test_compiled_accumulate_noise_with_many_seeds_is_bitwise_the_reference():
    # more seeds than the CPU op keeps in one buffer, and a bf16 tensor (rounded once)
    seeds = list(range(40))
    scales = [(-1) ** s * 0.01 * (s + 1) for s in seeds]
    compiled = [torch.randn(3000).bfloat16(), torch.randn(1234)]
    reference = [t.clone() for t in compiled]
    accumulate_noise_(compiled, seeds, scales, backend="compiled")
    accumulate_noise_reference_(reference, seeds, scales)
    assert all(torch.equal(c, r) for c, r in zip(compiled, reference, strict=True))


@needs_compiled
def test_a_parameters_stream_does_not_depend_on_how_the_list_is_split():
    flat = torch.zeros(9001)
    perturb_(flat, 42, 1.0, backend="compiled")
    for cuts in ([5, 4096], [1, 2, 3, 8000], [4095, 4097, 8192]):
        pieces = list(torch.zeros(9001).tensor_split(cuts))
        perturb_(pieces, 42, 1.0, backend="compiled")
        assert torch.equal(torch.cat(pieces), flat)
    assert torch.equal(flat, philox_normal_reference(9001, 42))


@needs_compiled
def test_compiled_stream_does_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            x = torch.zeros(3 * 4096 * 5 + 3)
            accumulate_noise_([x], [9, 10], [1.0, 0.5], backend="compiled")
            results.append(x)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@needs_compiled
def test_two_threads_with_different_seeds_get_their_own_streams():
    outputs: dict[int, torch.Tensor] = {}

    def work(seed: int) -> None:
        x = torch.zeros(50_000)
        for _ in range(5):
            x.zero_()
            perturb_(x, seed, 1.0, backend="compiled")
        outputs[seed] = x

    workers = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for seed in (1, 2):
        assert torch.equal(outputs[seed], philox_normal_reference(50_000, seed))


@pytest.mark.parametrize("backend", ["reference", pytest.param("compiled", marks=needs_compiled)])
def test_noise_ops_leave_the_global_generator_alone(backend):
    state = torch.get_rng_state()
    x = torch.zeros(100)
    perturb_(x, 3, 1.0, backend=backend)
    philox_normal(10, 4, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", ["reference", pytest.param("compiled", marks=needs_compiled)])
@pytest.mark.parametrize("dtype", FLOATING)
def test_perturb_then_minus_scale_undoes_it_within_one_rounding_each_way(backend, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5000, generator=g) * 3).to(dtype)
    original = x.clone()
    perturb_(x, 11, 0.05, backend=backend)
    assert not torch.equal(x, original)
    perturb_(x, 11, -0.05, backend=backend)
    # |x'' - x| <= one unit of x's precision at the magnitude of x and of the noise
    eps = torch.finfo(dtype).eps
    bound = 2 * eps * (original.double().abs() + 0.05 * 6)
    assert ((x.double() - original.double()).abs() <= bound).all()


@needs_compiled
def test_compiled_perturb_of_a_parameter_that_requires_grad_is_invisible_to_autograd():
    p = torch.nn.Parameter(torch.zeros(64))
    perturb_([p], 5, 0.1, backend="compiled")
    assert p.requires_grad and p.grad_fn is None
    assert torch.equal(p.detach(), 0.1 * philox_normal_reference(64, 5))


def test_auto_backend_is_compiled_exactly_when_the_extension_has_the_ops():
    assert (_compiled_noise_ops(torch.device("cpu")) is not None) == COMPILED
    assert _compiled_noise_ops(torch.device("meta")) is None
    with pytest.raises(RuntimeError, match="backend: 'compiled'"):
        philox_normal(4, 1, device="meta", backend="compiled")


# -------------------------------------------------------------- statistics
@needs_compiled
def test_stream_moments_are_those_of_a_standard_normal():
    n = 2**21
    z = philox_normal(n, 2024, backend="compiled").double()
    se = 1 / math.sqrt(n)
    # standard errors of mean, variance, skewness and excess kurtosis: 1, sqrt 2,
    # sqrt 6, sqrt 24 over sqrt n; intervals of 5 standard errors
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs((z**3).mean()) < 5 * math.sqrt(15) * se  # E z^6 = 15
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96) * se  # Var z^4 = 105 - 9
    # tails: P(|z| > 3) = 0.0026998 and P(|z| > 4) = 6.334e-5, binomial 5-sigma
    for threshold, p in ((3.0, 2.6998e-3), (4.0, 6.334e-5)):
        observed = float((z.abs() > threshold).double().mean())
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n)
    # the uniforms are 2**23 values in (0, 1): the largest radius is sqrt(-2 log 2**-24)
    assert z.abs().max() < math.sqrt(2 * 24 * math.log(2)) + 1e-6


@needs_compiled
def test_adjacent_seeds_and_offsets_are_uncorrelated():
    n = 2**20
    bound = 5 / math.sqrt(n)  # 5 standard errors of a correlation of independent pairs

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    z = philox_normal(n + 8, 77, backend="compiled")
    for lag in (1, 2, 3, 4, 5, 8):  # lanes of one block (1-3), next blocks (4, 8)
        assert abs(corr(z[:n], z[lag : lag + n])) < bound
    # the two lanes that share a Box-Muller radius are independent: squares too
    assert abs(corr(z[0:n:2] ** 2, z[1:n:2] ** 2)) < bound * math.sqrt(2)
    for seed in (0, 2**32 - 1, 2**32):  # neighbours in either key word
        a = philox_normal(n, seed, backend="compiled")
        b = philox_normal(n, seed + 1, backend="compiled")
        assert abs(corr(a, b)) < bound
    # offsets: the stream at offset k is the stream shifted, not a new one
    shifted = philox_normal(n, 77, 4, backend="compiled")
    assert torch.equal(shifted, z[4 : 4 + n])


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", ["reference", pytest.param("compiled", marks=needs_compiled)])
@pytest.mark.parametrize(
    ("make_args", "error", "name"),
    [
        (lambda: ([torch.zeros(4), torch.zeros(4, 2).t()], [1], [1.0]), ValueError, "tensors[1]"),
        (
            lambda: ([torch.zeros(4), torch.zeros(3, dtype=torch.int32)], [1], [1.0]),
            TypeError,
            "tensors[1]",
        ),
        (
            lambda: ([torch.zeros(4), torch.zeros(3, device="meta")], [1], [1.0]),
            ValueError,
            "tensors[1]",
        ),
        (lambda: ([torch.zeros(4)], [1, -1], [1.0, 1.0]), ValueError, "seeds[1]"),
        (lambda: ([torch.zeros(4)], [2**63], [1.0]), ValueError, "seeds[0]"),
        (lambda: ([torch.zeros(4)], [1, 2], [1.0]), ValueError, "scales"),
        (lambda: ([torch.zeros(4)], [1], [math.inf]), ValueError, "scales[0]"),
        (lambda: ([torch.zeros(4)], [1.5], [1.0]), TypeError, "seeds[0]"),
        (lambda: ([], [1], [1.0]), ValueError, "tensors"),
        (lambda: ("x", [1], [1.0]), TypeError, "tensors"),
    ],
)
def test_bad_accumulate_arguments_raise_naming_the_argument_before_any_write(
    backend, make_args, error, name
):
    tensors, seeds, scales = make_args()
    before = [t.clone() for t in tensors] if isinstance(tensors, list) else None
    with pytest.raises(error) as info:
        accumulate_noise_(tensors, seeds, scales, backend=backend)
    assert str(info.value).startswith(name + ":")
    if before is not None:
        for t, b in zip(tensors, before, strict=True):
            if t.device.type == "cpu":
                assert torch.equal(t, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"numel": -1, "seed": 1}, ValueError, "numel"),
        ({"numel": 4, "seed": -2}, ValueError, "seed"),
        ({"numel": 4, "seed": 1, "offset": 2**62}, ValueError, "offset"),
        ({"numel": 4, "seed": 1, "dtype": torch.int64}, TypeError, "dtype"),
        ({"numel": 4, "seed": 1, "backend": "fast"}, ValueError, "backend"),
    ],
)
def test_bad_philox_normal_arguments_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=f"^{name}:"):
        philox_normal(**kwargs)


@needs_compiled
@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda out: torch.ops.riskfast.philox_normal_fill_(out, -1, 0), ValueError, "seed"),
        (lambda out: torch.ops.riskfast.philox_normal_fill_(out, 1, 2**62), ValueError, "offset"),
        (lambda out: torch.ops.riskfast.philox_normal_fill_(out.t(), 1, 0), ValueError, "out"),
        (
            lambda out: torch.ops.riskfast.accumulate_noise_([out, out.t()], [1], [1.0]),
            ValueError,
            "tensors[1]",
        ),
        (
            lambda out: torch.ops.riskfast.accumulate_noise_([out], [1, 2], [1.0]),
            ValueError,
            "scales",
        ),
        (
            lambda out: torch.ops.riskfast.accumulate_noise_([out.long()], [1], [1.0]),
            TypeError,
            "tensors[0]",
        ),
    ],
)
def test_the_compiled_ops_check_their_arguments_themselves(call, error, name):
    out = torch.zeros(4, 6)
    with pytest.raises(error) as info:
        call(out)
    assert str(info.value).startswith(name + ":")
    assert torch.equal(out, torch.zeros(4, 6))


# -------------------------------------------------------------- torch custom ops
@needs_compiled
def test_noise_ops_pass_torch_library_opcheck():
    out = torch.empty(37)
    torch.library.opcheck(torch.ops.riskfast.philox_normal_fill_, (out, 3, 5))
    tensors = [torch.randn(10), torch.randn(3, 4, dtype=torch.float64), torch.randn(7).bfloat16()]
    torch.library.opcheck(torch.ops.riskfast.accumulate_noise_, (tensors, [1, 2], [0.5, -0.25]))


@needs_compiled
def test_perturb_works_under_torch_compile():
    def step(params: list[torch.Tensor]) -> torch.Tensor:
        torch.ops.riskfast.accumulate_noise_(params, [3, 4], [0.5, -0.5])
        return sum(p.sum() for p in params)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_params = [torch.zeros(10), torch.ones(5)]
    compiled_params = [p.clone() for p in eager_params]
    assert torch.equal(step(eager_params), compiled(compiled_params))
    assert all(torch.equal(a, b) for a, b in zip(eager_params, compiled_params, strict=True))
