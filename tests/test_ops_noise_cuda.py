"""The CUDA noise ops of ``riskfast._C`` on a GPU (run by ``benchmarks/gpu_check.py``).

Skipped, with the reason, without a CUDA device or without the CUDA build of the ops.
Claims: the CUDA stream uses the CUDA reference's float32 functions (``logf``,
``sqrtf``, ``sinf``, ``cosf``), so it is expected to equal the reference computed on
the same device bitwise; against the CPU stream (MKL's functions) it is within a few
float32 ulps (asserted: 4; the measured counts are printed and recorded by
gpu_check). Lists of any length (several launches of 40 tensors), more than 64 seeds
(several launches, 16-bit tensors rounded once), CUDA-graph capture, bad input.
"""

from __future__ import annotations

import pytest
import torch

from riskfast.ops import accumulate_noise_, perturb_, philox_normal
from riskfast.ops.noise import _compiled_noise_ops
from riskfast.ops.philox import accumulate_noise_reference_, philox_normal_reference

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA or _compiled_noise_ops(torch.device("cuda")) is None,
    reason="needs a CUDA device and riskfast._C built with CUDA (see riskfast info)",
)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.cpu().view(torch.int32).long() - b.cpu().view(torch.int32).long()).abs()


@pytest.mark.parametrize(("seed", "offset"), [(0, 0), (2**40 + 3, 4 * (2**32 - 7) + 1)])
def test_cuda_stream_against_the_cuda_and_cpu_references(seed, offset):
    n = 1 << 20
    compiled = philox_normal(n, seed, offset, device="cuda", backend="compiled")
    on_device = philox_normal_reference(n, seed, offset, device="cuda")
    on_cpu = philox_normal_reference(n, seed, offset)
    vs_device, vs_cpu = _ulps(compiled, on_device), _ulps(compiled, on_cpu)
    print(
        f"seed {seed} offset {offset}: differ from the CUDA reference in "
        f"{int((vs_device > 0).sum())} of {n} (max {int(vs_device.max())} ulps), from the "
        f"CPU stream in {int((vs_cpu > 0).sum())} (max {int(vs_cpu.max())} ulps)"
    )
    assert int(vs_device.max()) <= 4
    assert int(vs_cpu.max()) <= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_fill_casts_the_float32_stream(dtype):
    stream = philox_normal(5003, 9, 3, device="cuda", backend="compiled")
    cast = philox_normal(5003, 9, 3, device="cuda", dtype=dtype, backend="compiled")
    assert torch.equal(cast, stream.to(dtype))


def test_cuda_accumulate_follows_the_reference_for_every_dtype_and_split():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 0, 4099, 17, 5000, 1] * 9  # 54 tensors: two launches of <= 40
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    tensors = [torch.randn(n, generator=g).to(dtypes[i % 4]).cuda() for i, n in enumerate(sizes)]
    seeds, scales = [1, 2**40 + 1, 3], [0.1, -0.37, 1e-3]
    compiled = [t.clone() for t in tensors]
    reference = [t.clone() for t in tensors]
    accumulate_noise_(compiled, seeds, scales, backend="compiled")
    accumulate_noise_reference_(reference, seeds, scales)
    for c, r in zip(compiled, reference, strict=True):
        tol = 2 * torch.finfo(c.dtype).eps
        assert torch.allclose(c.double(), r.double(), rtol=tol, atol=tol)
    flat = torch.cat([t.float().flatten() for t in tensors if t.dtype == torch.float32])
    pieces = [t.float().flatten() for t in tensors if t.dtype == torch.float32]
    whole = flat.clone()
    perturb_(whole, 5, 1.0, backend="compiled")
    perturb_(pieces, 5, 1.0, backend="compiled")
    assert torch.equal(torch.cat(pieces), whole)


def test_cuda_accumulate_with_more_seeds_than_one_launch_rounds_16bit_once():
    seeds = list(range(70))
    scales = [0.01 * (-1) ** s for s in seeds]
    base = torch.randn(3000, generator=torch.Generator().manual_seed(1))
    bf16 = base.bfloat16().cuda()
    accumulate_noise_([bf16], seeds, scales, backend="compiled")
    # rounded once from float32 at the end: exactly the float32 result's rounding
    expected = base.bfloat16().float().cuda()
    accumulate_noise_([expected], seeds, scales, backend="compiled")
    assert torch.equal(bf16, expected.bfloat16())


def test_cuda_perturb_is_undone_by_minus_scale_and_captured_by_cuda_graphs():
    x = torch.randn(100_000, device="cuda")
    original = x.clone()
    perturb_(x, 3, 0.05, backend="compiled")
    perturb_(x, 3, -0.05, backend="compiled")
    assert (
        (x - original).abs() <= 2 * torch.finfo(torch.float32).eps * (original.abs() + 0.3)
    ).all()
    params = [torch.zeros(1000, device="cuda"), torch.zeros(77, device="cuda")]
    eager = [p.clone() for p in params]
    accumulate_noise_(eager, [4, 5], [0.5, 0.25], backend="compiled")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        accumulate_noise_([p.clone() for p in params], [4, 5], [0.5, 0.25], backend="compiled")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        accumulate_noise_(params, [4, 5], [0.5, 0.25], backend="compiled")
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(p, e) for p, e in zip(params, eager, strict=True))


def test_cuda_noise_ops_pass_opcheck_and_reject_mixed_devices():
    out = torch.empty(37, device="cuda")
    torch.library.opcheck(torch.ops.riskfast.philox_normal_fill_, (out, 3, 5))
    tensors = [torch.randn(10, device="cuda"), torch.randn(7, device="cuda").bfloat16()]
    torch.library.opcheck(torch.ops.riskfast.accumulate_noise_, (tensors, [1, 2], [0.5, -0.25]))
    with pytest.raises(ValueError, match=r"^tensors\[1\]:"):
        torch.ops.riskfast.accumulate_noise_([tensors[0], torch.zeros(3)], [1], [1.0])
