"""The transition log-density: the reference against the float64 loop oracle, the
compiled op of ``riskfast._C`` against the reference, gradients, the [B, T] step form,
and bad input.

Claims (spec ``rlr.md``, "The chain" and the fused transition log-density):

* the reference's mean and ``log N(x_prev; mean, sigma^2 I)`` equal the loop oracle
  (``tests/oracles/rlr_oracle.py``: DDIM eq. 12, DDPM eq. 7, written from the papers)
  in float64 to 1e-12 relative, for every prediction type, with and without the x0
  clamp, summed or averaged; its gradients pass ``gradcheck``;
* the compiled op equals the reference: float32 log-densities and means to 1e-6
  relative, gradients to 1e-5 relative (spec: 1e-4); float64 to 1e-12, and its own
  backward passes ``gradcheck``; 16-bit inputs against the float32 reference on the
  same values: log-densities to 1e-6 relative (both compute in float32), gradients
  within one 16-bit rounding (2 ulps of the dtype);
* ``transition_log_prob_into`` writes exactly column ``step`` of a ``[B, T]`` buffer;
* bad input raises ``ValueError``/``TypeError`` naming the argument before any write.
"""

from __future__ import annotations

import math

import pytest
import torch
from oracles import rlr_oracle

from riskfast.ops import TransitionCoefficients, transition_log_prob, transition_log_prob_into
from riskfast.ops.transition import _compiled_transition_op, transition_log_prob_reference

COMPILED = _compiled_transition_op(torch.device("cpu")) is not None
needs_compiled = pytest.mark.skipif(
    not COMPILED,
    reason="riskfast._C has no CPU transition op (extension missing; see riskfast info)",
)
PREDICTIONS = ("epsilon", "sample", "v_prediction")
BACKENDS = ["reference", pytest.param("compiled", marks=needs_compiled)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread (tests that vary it set their own): on a shared 2-core machine
    two spinning threads per process oversubscribe the cores and a 10 ms op takes 10 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(shape, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
        for _ in range(3)
    )


def _ddim(a_t=0.55, a_prev=0.7, eta=1.0, prediction="epsilon", clip=None):
    """DDIM coefficients as riskfast.rlr derives them, and the oracle's sigma."""
    s = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    return TransitionCoefficients(
        a_t, math.sqrt(a_prev), math.sqrt(1 - a_prev - s * s), 0.0, s, prediction, clip
    )


def _ddpm(a_t=0.55, a_prev=0.7, prediction="epsilon", clip=None):
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    c_x0 = math.sqrt(a_prev) * beta_t / (1 - a_t)
    c_xt = math.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * beta_t)
    return TransitionCoefficients(a_t, c_x0, 0.0, c_xt, sigma, prediction, clip)


# ---------------------------------------------------------------- reference vs oracle
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [None, 0.8])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_reference_matches_the_float64_loop_oracle(prediction, clip, sampler, reduce):
    x_prev, x_t, out = _inputs((3, 2, 5), torch.float64, seed=1)
    coefficients = (_ddim if sampler == "ddim" else _ddpm)(prediction=prediction, clip=clip)
    log_prob, mean = transition_log_prob(
        x_prev, x_t, out, coefficients, reduce=reduce, return_mean=True, backend="reference"
    )
    for b in range(3):
        step = rlr_oracle.ddim_step if sampler == "ddim" else rlr_oracle.ddpm_step
        kwargs = {"eta": 1.0} if sampler == "ddim" else {}
        oracle_mean, s = step(
            x_t[b].flatten().tolist(),
            out[b].flatten().tolist(),
            0.55,
            0.7,
            prediction_type=prediction,
            clip=clip,
            **kwargs,
        )
        assert s == pytest.approx(coefficients.sigma, rel=1e-12)
        assert mean[b].flatten().tolist() == pytest.approx(oracle_mean, rel=1e-12, abs=1e-12)
        density = rlr_oracle.gaussian_log_density(x_prev[b].flatten().tolist(), oracle_mean, s)
        if reduce == "mean":
            density /= 10
        assert float(log_prob[b]) == pytest.approx(density, rel=1e-12)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_reference_gradients_pass_gradcheck(prediction):
    inputs = _inputs((2, 3), torch.float64, seed=2, requires_grad=True)
    coefficients = _ddim(prediction=prediction, clip=1.5)

    def f(x_prev, x_t, out):
        log_prob, mean = transition_log_prob(
            x_prev, x_t, out, coefficients, reduce="sum", return_mean=True, backend="reference"
        )
        return log_prob, mean

    assert torch.autograd.gradcheck(f, inputs)


def test_reference_clamps_log_ratios_against_stored_ones():
    x_prev, x_t, out = _inputs((4, 6), torch.float64, seed=3)
    coefficients = _ddim()
    raw = transition_log_prob(x_prev, x_t, out, coefficients, backend="reference")
    old = raw + torch.tensor([30.0, -30.0, 5.0, 0.0], dtype=torch.float64)
    clamped = transition_log_prob(
        x_prev,
        x_t,
        out,
        coefficients,
        old_log_prob=old,
        log_ratio_bound=20.0,
        backend="reference",
    )
    expected = torch.stack([old[0] - 20, old[1] + 20, raw[2], raw[3]])
    assert torch.allclose(clamped, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------- compiled vs reference
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@needs_compiled
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("sampler", [_ddim, _ddpm])
def test_compiled_float32_equals_the_reference(prediction, clip, reduce, sampler):
    # (B, 4, 32, 32): several chunks of the compiled op per sample
    inputs = _inputs((3, 4, 32, 32), torch.float32, seed=4, requires_grad=True)
    coefficients = sampler(prediction=prediction, clip=clip)
    g = torch.Generator().manual_seed(5)
    w_log_prob, w_mean = torch.randn(3, generator=g), torch.randn(3, 4, 32, 32, generator=g)
    results = {}
    for backend in ("reference", "compiled"):
        log_prob, mean = transition_log_prob(
            *inputs, coefficients, reduce=reduce, return_mean=True, backend=backend
        )
        grads = torch.autograd.grad((log_prob * w_log_prob).sum() + (mean * w_mean).sum(), inputs)
        results[backend] = (log_prob, mean, grads)
    ref, com = results["reference"], results["compiled"]
    assert com[0].dtype == torch.float32 and com[1].dtype == torch.float32
    assert ((com[0] - ref[0]).abs() <= 1e-6 * ref[0].abs()).all()
    assert _rel(com[1], ref[1]) < 1e-6
    for grad_c, grad_r in zip(com[2], ref[2], strict=True):
        assert _rel(grad_c, grad_r) < 1e-5


@needs_compiled
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)])
@pytest.mark.parametrize("through_mean", [False, True], ids=["log_prob", "log_prob+mean"])
def test_compiled_gradients_of_some_inputs_equal_those_of_all(prediction, wanted, through_mean):
    # float32 has one backward loop per set of wanted gradients (and per presence of a
    # gradient of the mean): each must give the bits of the all-three loop and follow
    # the reference
    inputs = _inputs((2, 4, 32, 32), torch.float32, seed=18)
    coefficients = _ddim(prediction=prediction, clip=1.0)
    g = torch.Generator().manual_seed(19)
    w_log_prob, w_mean = torch.randn(2, generator=g), torch.randn(2, 4, 32, 32, generator=g)

    def grads(backend, which):
        leaves = [t.clone().requires_grad_(i in which) for i, t in enumerate(inputs)]
        log_prob, mean = transition_log_prob(
            *leaves, coefficients, return_mean=True, backend=backend
        )
        loss = (log_prob * w_log_prob).sum()
        if through_mean:
            loss = loss + (mean * w_mean).sum()
        return torch.autograd.grad(loss, [leaves[i] for i in which])

    every = grads("compiled", (0, 1, 2))
    some, reference = grads("compiled", wanted), grads("reference", wanted)
    for k, i in enumerate(wanted):
        assert torch.equal(some[k], every[i])
        assert _rel(some[k], reference[k]) < 1e-5


@needs_compiled
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_compiled_float64_equals_the_reference_and_passes_gradcheck(prediction):
    inputs = _inputs((2, 3, 5), torch.float64, seed=6, requires_grad=True)
    coefficients = _ddpm(prediction=prediction, clip=1.2)
    ref = transition_log_prob(*inputs, coefficients, return_mean=True, backend="reference")
    com = transition_log_prob(*inputs, coefficients, return_mean=True, backend="compiled")
    assert com[0].dtype == torch.float64
    assert torch.allclose(com[0], ref[0], rtol=1e-12, atol=0)
    assert torch.allclose(com[1], ref[1], rtol=1e-12, atol=1e-14)

    def f(*args):
        return transition_log_prob(*args, coefficients, return_mean=True, backend="compiled")

    assert torch.autograd.gradcheck(f, inputs)


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_compiled_16bit_inputs_against_the_float32_reference(dtype, prediction):
    inputs = _inputs((2, 4, 16, 16), dtype, seed=7, requires_grad=True)
    coefficients = _ddim(prediction=prediction, clip=1.0)
    log_prob, mean = transition_log_prob(
        *inputs, coefficients, return_mean=True, backend="compiled"
    )
    assert log_prob.dtype == torch.float32 and mean.dtype == torch.float32
    upcast = tuple(t.detach().float().requires_grad_() for t in inputs)
    ref_log_prob, ref_mean = transition_log_prob(
        *upcast, coefficients, return_mean=True, backend="reference"
    )
    assert ((log_prob - ref_log_prob).abs() <= 1e-6 * ref_log_prob.abs()).all()
    assert _rel(mean, ref_mean) < 1e-6
    grads = torch.autograd.grad(log_prob.sum(), inputs)
    ref_grads = torch.autograd.grad(ref_log_prob.sum(), upcast)
    ulp = torch.finfo(dtype).eps
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        # both round a float32 gradient to the dtype once: at most 2 ulps apart
        assert ((grad.float() - ref).abs() <= 2 * ulp * ref.abs() + 1e-30).all()


@needs_compiled
def test_compiled_clamp_and_its_gradient_follow_the_reference():
    inputs = _inputs((4, 8), torch.float32, seed=8, requires_grad=True)
    coefficients = _ddim()
    raw = transition_log_prob(*inputs, coefficients, backend="reference").detach()
    old = raw + torch.tensor([30.0, -30.0, 5.0, 0.0])
    out = {}
    for backend in ("reference", "compiled"):
        log_prob = transition_log_prob(
            *inputs, coefficients, old_log_prob=old, log_ratio_bound=20.0, backend=backend
        )
        out[backend] = (log_prob, torch.autograd.grad(log_prob.sum(), inputs))
    assert torch.allclose(out["compiled"][0], out["reference"][0], rtol=1e-6, atol=0)
    for grad_c, grad_r in zip(out["compiled"][1], out["reference"][1], strict=True):
        assert torch.equal(grad_c[:2], torch.zeros_like(grad_c[:2]))  # clamped samples
        assert torch.allclose(grad_c, grad_r, rtol=1e-5, atol=1e-6)


@needs_compiled
def test_compiled_takes_non_contiguous_and_mixed_dtype_inputs():
    x_prev, x_t, out = _inputs((5, 3, 4), torch.float32, seed=9)
    coefficients = _ddim(prediction="v_prediction")
    expected = transition_log_prob(x_prev, x_t, out, coefficients, backend="reference")
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (x_prev, x_t, out)]
    assert not strided[0].is_contiguous()
    got = transition_log_prob(*strided, coefficients, backend="compiled")
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    mixed = (x_prev, x_t.bfloat16(), out.bfloat16())
    assert torch.allclose(
        transition_log_prob(*mixed, coefficients, backend="compiled"),
        transition_log_prob(*mixed, coefficients, backend="reference"),
        rtol=1e-6,
        atol=0,
    )


@needs_compiled
def test_compiled_log_prob_does_not_depend_on_the_thread_count():
    inputs = _inputs((2, 4, 64, 64), torch.float32, seed=10)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(transition_log_prob(*inputs, _ddim(), backend="compiled"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_finite_inputs_give_finite_log_probs(backend):
    g = torch.Generator().manual_seed(11)
    x_prev, x_t, out = (torch.randn(2, 4096, generator=g) * 1e3 for _ in range(3))
    for coefficients in (
        TransitionCoefficients(1e-4, 1.0, 0.5, 0.1, 1e-3, "epsilon", None),
        TransitionCoefficients(1 - 1e-6, 1.0, 0.0, 0.0, 1e-2, "sample", 1.0),
        TransitionCoefficients(0.5, 1.0, 1.0, 0.0, 50.0, "v_prediction", None),
    ):
        log_prob, mean = transition_log_prob(
            x_prev, x_t, out, coefficients, return_mean=True, backend=backend
        )
        assert torch.isfinite(log_prob).all() and torch.isfinite(mean).all()


# ---------------------------------------------------------------------- [B, T] form
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_form_writes_exactly_its_column(backend, dtype):
    x_prev, x_t, out = _inputs((3, 4, 8), torch.float32, seed=12)
    coefficients = _ddpm(prediction="sample")
    storage = torch.full((5, 3), 7.0, dtype=dtype)
    log_probs = storage.t()  # [B, T] = [3, 5] with strides (1, 3)
    column = transition_log_prob_into(
        log_probs, 2, x_prev, x_t, out, coefficients, reduce="mean", backend=backend
    )
    expected = transition_log_prob(
        x_prev, x_t, out, coefficients, reduce="mean", backend="reference"
    )
    assert column.data_ptr() == log_probs[:, 2].data_ptr()
    assert torch.allclose(log_probs[:, 2], expected.to(dtype), rtol=1e-6, atol=0)
    others = [t for t in range(5) if t != 2]
    assert (log_probs[:, others] == 7.0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("buffer", "step", "error", "name"),
    [
        (torch.zeros(3, 5, dtype=torch.bfloat16), 0, TypeError, "log_probs"),
        (torch.zeros(2, 5), 0, ValueError, "log_probs"),
        (torch.zeros(3, 5), 5, ValueError, "step"),
        (torch.zeros(3, 5), -1, ValueError, "step"),
        (torch.zeros(3, 5), 1.0, TypeError, "step"),
    ],
)
def test_step_form_rejects_a_bad_buffer_or_step_before_writing(backend, buffer, step, error, name):
    x_prev, x_t, out = _inputs((3, 4), torch.float32, seed=13)
    before = buffer.clone()
    with pytest.raises(error) as info:
        transition_log_prob_into(buffer, step, x_prev, x_t, out, _ddim(), backend=backend)
    assert str(info.value).startswith(name + ":")
    assert torch.equal(buffer, before)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("mutate", "error", "name"),
    [
        (lambda a: {**a, "x_prev": a["x_prev"][:, :3]}, ValueError, "x_prev"),
        (lambda a: {**a, "model_output": a["model_output"].long()}, TypeError, "model_output"),
        (lambda a: {**a, "model_output": a["model_output"].to("meta")}, ValueError, "model_output"),
        (
            lambda a: {**a, "coefficients": _ddim()._replace(sigma=0.0)},
            ValueError,
            "coefficients.sigma",
        ),
        (
            lambda a: {**a, "coefficients": _ddim()._replace(alpha_prod_t=1.0)},
            ValueError,
            "coefficients.alpha_prod_t",
        ),
        (
            lambda a: {**a, "coefficients": _ddim()._replace(prediction_type="x0")},
            ValueError,
            "coefficients.prediction_type",
        ),
        (
            lambda a: {**a, "coefficients": _ddim()._replace(clip_range=-1.0)},
            ValueError,
            "coefficients.clip_range",
        ),
        (lambda a: {**a, "reduce": "max"}, ValueError, "reduce"),
        (lambda a: {**a, "old_log_prob": torch.zeros(2)}, ValueError, "old_log_prob"),
        (lambda a: {**a, "log_ratio_bound": 0.0}, ValueError, "log_ratio_bound"),
        (lambda a: {**a, "return_mean": 1}, TypeError, "return_mean"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(backend, mutate, error, name):
    x_prev, x_t, out = _inputs((3, 4), torch.float32, seed=14)
    args = {"x_prev": x_prev, "sample": x_t, "model_output": out, "coefficients": _ddim()}
    args = mutate(args)
    with pytest.raises(error) as info:
        transition_log_prob(**args, backend=backend)
    assert str(info.value).startswith(name + ":")


@needs_compiled
@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        ({"x_prev": torch.zeros(3, 5)}, ValueError, "x_prev"),
        ({"model_output": torch.zeros(3, 4, dtype=torch.float64)}, TypeError, "model_output"),
        ({"sigma": -1.0}, ValueError, "coefficients.sigma"),
        ({"prediction_type": "x0"}, ValueError, "coefficients.prediction_type"),
        ({"reduce": "max"}, ValueError, "reduce"),
        ({"clip_range": 0.0}, ValueError, "coefficients.clip_range"),
    ],
)
def test_the_compiled_op_checks_its_arguments_itself(change, error, name):
    args = {
        "x_prev": torch.zeros(3, 4),
        "sample": torch.zeros(3, 4),
        "model_output": torch.zeros(3, 4),
        "alpha_prod_t": 0.5,
        "coef_x0": 1.0,
        "coef_eps": 0.5,
        "coef_sample": 0.0,
        "sigma": 0.1,
        "prediction_type": "epsilon",
        "clip_range": None,
        "reduce": "sum",
        "return_mean": False,
    }
    args.update(change)
    with pytest.raises(error) as info:
        torch.ops.riskfast.transition_log_prob(*args.values())
    assert str(info.value).startswith(name + ":")


# ---------------------------------------------------------------------- custom op
@needs_compiled
def test_transition_ops_pass_torch_library_opcheck():
    ops = torch.ops.riskfast
    inputs = _inputs((2, 3, 4), torch.float32, seed=15, requires_grad=True)
    scalars = (0.5, 0.7, 0.3, 0.1, 0.2)
    torch.library.opcheck(ops.transition_log_prob, (*inputs, *scalars, "epsilon", 1.5, "sum", True))
    torch.library.opcheck(
        ops.transition_log_prob, (*inputs, *scalars, "v_prediction", None, "mean", False)
    )
    plain = tuple(t.detach() for t in inputs)
    torch.library.opcheck(
        ops.transition_log_prob_backward,
        (
            torch.randn(2),
            torch.randn(2, 3, 4),
            *plain,
            *scalars,
            "sample",
            None,
            "sum",
            [True, False, True],
        ),
    )
    torch.library.opcheck(
        ops.transition_log_prob_into_,
        (torch.zeros(2, 4), 1, *plain, *scalars, "sample", None, "sum"),
    )


@needs_compiled
def test_the_autograd_formula_is_a_cpp_kernel_and_mean_only_gradients_flow():
    # The formula is registered in C++ (csrc/transition_autograd.cpp) for its host time:
    # through torch.library.register_autograd a differentiable call cost 4x the host time
    # on the development CPU (RESULTS.md). A gradient through the mean alone (no
    # gradient arrives for log_prob) equals the reference's.
    op = "riskfast::transition_log_prob"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")
    coefficients = _ddim(prediction="epsilon", clip=1.5)
    grads = []
    for backend in ("compiled", "reference"):
        leaves = _inputs((3, 5), torch.float64, seed=21, requires_grad=True)
        _, mean = transition_log_prob(*leaves, coefficients, return_mean=True, backend=backend)
        grads.append(torch.autograd.grad((mean * mean).sum(), leaves, allow_unused=True))
    for compiled, reference in zip(*grads):
        if reference is None:
            assert compiled is None or not compiled.any()
        else:
            torch.testing.assert_close(compiled, reference, rtol=1e-12, atol=1e-12)


@needs_compiled
def test_compiled_transition_works_under_torch_compile_with_gradients():
    coefficients = _ddim(prediction="v_prediction", clip=1.0)

    def loss(x_prev, x_t, out):
        log_prob, mean = transition_log_prob(
            x_prev, x_t, out, coefficients, return_mean=True, backend="compiled"
        )
        return log_prob.sum() + mean.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_inputs = _inputs((2, 3, 8), torch.float32, seed=16, requires_grad=True)
    compiled_inputs = tuple(t.detach().clone().requires_grad_() for t in eager_inputs)
    eager_grads = torch.autograd.grad(loss(*eager_inputs), eager_inputs)
    compiled_grads = torch.autograd.grad(compiled(*compiled_inputs), compiled_inputs)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        assert torch.equal(a, b)


def test_reference_function_is_the_composition_of_the_formula_owners():
    x_prev, x_t, out = _inputs((2, 5), torch.float32, seed=17)
    log_prob, mean = transition_log_prob_reference(x_prev, x_t, out, _ddim())
    assert log_prob.shape == (2,) and mean.shape == (2, 5)
