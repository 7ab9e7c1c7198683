"""The CUDA transition op of ``riskfast._C`` on a GPU (run by ``benchmarks/gpu_check.py``).

Skipped, with the reason, without a CUDA device or the CUDA build of the op. The CUDA
op against the reference on the same device: float32 log-densities and means to 1e-6
relative, gradients to 1e-5; float64 to 1e-12; bf16 inputs against the float32
reference on the same values to 1e-6; the [B, T] step form; deterministic results
(no atomics); ``opcheck``, ``torch.compile`` and CUDA-graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

from riskfast.ops import TransitionCoefficients, transition_log_prob, transition_log_prob_into
from riskfast.ops.transition import _compiled_transition_op

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _compiled_transition_op(torch.device("cuda")) is None,
    reason="needs a CUDA device and riskfast._C built with CUDA (see riskfast info)",
)


def _coefficients(prediction="epsilon", clip=None):
    a_t, a_prev = 0.55, 0.7
    s = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    return TransitionCoefficients(
        a_t, math.sqrt(a_prev), math.sqrt(1 - a_prev - s * s), 0.1, s, prediction, clip
    )


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=g).to(dtype).cuda().requires_grad_() for _ in range(3)
    )


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_cuda_float32_equals_the_reference(prediction, clip, reduce):
    inputs = _inputs((3, 4, 32, 40), seed=1)
    coefficients = _coefficients(prediction, clip)
    weights = torch.randn(3, device="cuda")
    results = {}
    for backend in ("reference", "compiled"):
        log_prob, mean = transition_log_prob(
            *inputs, coefficients, reduce=reduce, return_mean=True, backend=backend
        )
        loss = (log_prob * weights).sum() + mean.square().sum()
        results[backend] = (log_prob, mean, torch.autograd.grad(loss, inputs))
    ref, com = results["reference"], results["compiled"]
    assert ((com[0] - ref[0]).abs() <= 1e-6 * ref[0].abs()).all()
    assert _rel(com[1], ref[1]) < 1e-6
    for a, b in zip(com[2], ref[2], strict=True):
        assert _rel(a, b) < 1e-5


def test_cuda_float64_and_bf16():
    inputs = _inputs((2, 3, 50), torch.float64, seed=2)
    coefficients = _coefficients("v_prediction", 1.2)
    ref = transition_log_prob(*inputs, coefficients, backend="reference")
    com = transition_log_prob(*inputs, coefficients, backend="compiled")
    assert torch.allclose(com, ref, rtol=1e-12, atol=0)
    bf16 = _inputs((2, 4, 16, 16), torch.bfloat16, seed=3)
    com = transition_log_prob(*bf16, coefficients, backend="compiled")
    ref = transition_log_prob(*(t.float() for t in bf16), coefficients, backend="reference")
    assert ((com - ref).abs() <= 1e-6 * ref.abs()).all()


def test_cuda_step_form_and_determinism():
    inputs = _inputs((8, 4, 64, 64), seed=4)
    coefficients = _coefficients("sample")
    storage = torch.full((50, 8), 7.0, device="cuda")
    log_probs = storage.t()
    transition_log_prob_into(log_probs, 3, *inputs, coefficients, backend="compiled")
    expected = transition_log_prob(*inputs, coefficients, backend="reference")
    assert torch.allclose(log_probs[:, 3], expected, rtol=1e-6, atol=0)
    assert (log_probs[:, [0, 1, 2, 4]] == 7.0).all()
    first = transition_log_prob(*inputs, coefficients, backend="compiled")
    assert all(
        torch.equal(first, transition_log_prob(*inputs, coefficients, backend="compiled"))
        for _ in range(3)
    )


def test_cuda_opcheck_compile_and_graph_capture():
    ops = torch.ops.riskfast
    inputs = _inputs((2, 3, 4), seed=5)
    scalars = (0.5, 0.7, 0.3, 0.1, 0.2)
    torch.library.opcheck(ops.transition_log_prob, (*inputs, *scalars, "epsilon", 1.5, "sum", True))
    coefficients = _coefficients("epsilon", 1.0)

    def loss(*args):
        return transition_log_prob(*args, coefficients, backend="compiled").sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(loss(*inputs), inputs)
    traced = torch.autograd.grad(compiled(*inputs), inputs)
    assert all(torch.equal(a, b) for a, b in zip(eager, traced, strict=True))
    plain = [t.detach() for t in inputs]
    log_probs = torch.zeros(2, 5, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        transition_log_prob_into(log_probs, 1, *plain, coefficients, backend="compiled")
    torch.cuda.current_stream().wait_stream(side)
    log_probs.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        transition_log_prob_into(log_probs, 1, *plain, coefficients, backend="compiled")
    graph.replay()
    torch.cuda.synchronize()
    expected = transition_log_prob(*plain, coefficients, backend="reference")
    assert torch.allclose(log_probs[:, 1], expected, rtol=1e-6, atol=0)
