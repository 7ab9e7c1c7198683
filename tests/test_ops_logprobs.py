"""riskfast.ops token log-probs: Triton kernels and the chunked torch path vs the reference.

Spec: ``spec/kernels.md`` (contracts and tolerances). On a CPU the Triton kernels run
under ``TRITON_INTERPRET=1`` (set by ``conftest.py``); on a CUDA machine (run with
``TRITON_INTERPRET=0``) the same tests run the compiled kernels on the GPU.

The oracle is :mod:`riskfast.ops.reference` evaluated in float64 on the same values
(for bf16/fp16 inputs: the same bf16/fp16 values upcast), with gradients from autograd.
"""

from __future__ import annotations

import pytest
import torch
from host_reads import HostReadCounter
from kernel_device import DEVICE

from riskfast.ops import (
    fused_linear_logprobs,
    fused_linear_logprobs_reference,
    selective_logprobs,
    selective_logprobs_reference,
)
from riskfast.ops.logprobs import _load_kernels

BACKENDS = ["triton", "torch"]

# The CPU interpreter evaluates both sides of every tl.where, also on masked lanes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# spec/kernels.md tolerances: fp32 rel. error 1e-5 (log-probs) / 1e-4 (gradients);
# 16-bit inputs: abs. error 1e-3 on log-probs, rel. error 2e-2 on gradients.
LOGP_REL_FP32, GRAD_REL_FP32 = 1e-5, 1e-4
LOGP_ABS_16, GRAD_REL_16 = 1e-3, 2e-2


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _check_values(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        assert _rel(out, ref) < LOGP_REL_FP32
    else:
        assert float((out.detach().double().cpu() - ref.double().cpu()).abs().max()) < LOGP_ABS_16


def _check_grad(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < (GRAD_REL_FP32 if dtype == torch.float32 else GRAD_REL_16)


def _weights(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(DEVICE), torch.randn(n, generator=gen).to(DEVICE)


def _loss(logp: torch.Tensor, entropy: torch.Tensor, g: torch.Tensor, g_h: torch.Tensor):
    return (logp.double() * g.double()).sum() + (entropy.double() * g_h.double()).sum()


# --------------------------------------------------------------------------------------
# selective_logprobs
# --------------------------------------------------------------------------------------


def _selective_case(n: int, v: int, dtype: torch.dtype, seed: int, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=gen) * scale).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    return logits, targets


def _selective_ref(logits, targets, temperature, g, g_h):
    leaf = logits.detach().double().requires_grad_(True)
    logp, entropy = selective_logprobs_reference(
        leaf, targets, temperature=temperature, return_entropy=True
    )
    _loss(logp, entropy, g, g_h).backward()
    return logp.detach(), entropy.detach(), leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selective_matches_reference_with_entropy_and_gradient(backend, dtype) -> None:
    # V = 1000 is not a multiple of any block; temperature != 1.
    n, v, temperature = 37, 1000, 0.7
    logits, targets = _selective_case(n, v, dtype, seed=1)
    g, g_h = _weights(n, seed=2)
    ref_logp, ref_ent, ref_grad = _selective_ref(logits, targets, temperature, g, g_h)

    leaf = logits.detach().clone().requires_grad_(True)
    logp, entropy = selective_logprobs(
        leaf, targets, temperature=temperature, return_entropy=True, backend=backend
    )
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logp.shape == (n,) and entropy.shape == (n,)
    _check_values(logp, ref_logp, dtype)
    _check_values(entropy, ref_ent, dtype)
    assert (logp <= 0).all() and (entropy >= 0).all()
    _loss(logp, entropy, g, g_h).backward()
    assert leaf.grad.dtype == dtype
    _check_grad(leaf.grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_single_token_tiny_vocab(backend) -> None:
    logits, targets = _selective_case(1, 7, torch.float32, seed=3)
    g, g_h = _weights(1, seed=4)
    ref_logp, ref_ent, ref_grad = _selective_ref(logits, targets, 1.0, g, g_h)
    leaf = logits.clone().requires_grad_(True)
    logp, entropy = selective_logprobs(leaf, targets, return_entropy=True, backend=backend)
    _check_values(logp, ref_logp, torch.float32)
    _check_values(entropy, ref_ent, torch.float32)
    _loss(logp, entropy, g, g_h).backward()
    _check_grad(leaf.grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_gradient_of_entropy_alone(backend) -> None:
    # An entropy bonus with no log-prob term: the logp gradient is absent (None).
    logits, targets = _selective_case(9, 300, torch.float32, seed=5)
    zeros, g_h = torch.zeros(9, device=DEVICE), torch.ones(9, device=DEVICE)
    _, _, ref_grad = _selective_ref(logits, targets, 2.0, zeros, g_h)
    leaf = logits.clone().requires_grad_(True)
    _, entropy = selective_logprobs(
        leaf, targets, temperature=2.0, return_entropy=True, backend=backend
    )
    entropy.sum().backward()
    _check_grad(leaf.grad, ref_grad, torch.float32)


@pytest.mark.parametrize(
    ("backend", "wide_columns"), [("triton", False), ("triton", True), ("torch", False)]
)
def test_selective_without_entropy_and_non_contiguous_logits(
    backend, wide_columns, monkeypatch
) -> None:
    # A transposed view: the vocabulary stride is not 1. With wide_columns the kernels
    # take their 64-bit column-offset path, the one a transposed view of more than
    # 2**31 / V tokens needs (too large to allocate in a test, so it is forced here).
    forced: list[int] = []
    if wide_columns:
        module = _load_kernels().selective_logprobs
        monkeypatch.setattr(module, "_wide_columns", lambda v, *strides: forced.append(v) or True)
    base, targets = _selective_case(12, 301, torch.float32, seed=6)
    logits = base.T.contiguous().T
    assert not logits.is_contiguous()
    g, _ = _weights(12, seed=7)
    ref_logp, _, ref_grad = _selective_ref(logits, targets, 1.5, g, torch.zeros_like(g))
    leaf = logits.detach().clone().T.contiguous().T.requires_grad_(True)
    logp = selective_logprobs(leaf, targets, temperature=1.5, backend=backend)
    assert isinstance(logp, torch.Tensor)
    _check_values(logp, ref_logp, torch.float32)
    (logp.double() * g.double()).sum().backward()
    _check_grad(leaf.grad, ref_grad, torch.float32)
    assert forced == ([301, 301] if wide_columns else [])  # forward and backward launches


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_log_probs_never_positive_and_finite_at_extreme_logits(backend) -> None:
    # The target holds nearly all the mass (logp rounds to 0) or the logits are huge.
    n, v = 16, 50
    targets = torch.arange(n, device=DEVICE) % v
    logits = torch.full((n, v), -1e4, device=DEVICE)
    logits[torch.arange(n), targets] = 1e4
    logits[8:] = torch.randn(8, v, device=DEVICE) * 3e4
    logits.requires_grad_(True)
    logp, entropy = selective_logprobs(logits, targets, return_entropy=True, backend=backend)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all() and (entropy >= 0).all()
    ref_logp = selective_logprobs_reference(logits.detach().double(), targets)
    assert torch.allclose(logp.double(), ref_logp, atol=1e-3, rtol=1e-6)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_more_tokens_than_a_grid_dimension(backend) -> None:
    # N > 65,535: CUDA limits grid axes 1 and 2 to 65,535; the kernels use axis 0.
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip(
            "the interpreter has no CUDA grid limit to test, and its ~4,400 programs take "
            "about 60 s; runs in gpu_check's GPU subset"
        )
    logits, targets = _selective_case(70_001, 5, torch.float32, seed=8)
    logp = selective_logprobs(logits, targets, backend=backend)
    ref = selective_logprobs_reference(logits.double(), targets)
    _check_values(logp, ref, torch.float32)


def test_selective_kernel_is_deterministic() -> None:
    logits, targets = _selective_case(20, 333, torch.float32, seed=9)
    leaf = logits.clone().requires_grad_(True)
    runs = []
    for _ in range(2):
        leaf.grad = None
        logp, entropy = selective_logprobs(leaf, targets, return_entropy=True, backend="triton")
        (logp.sum() + 0.5 * entropy.sum()).backward()
        runs.append((logp, entropy, leaf.grad.clone()))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_selective_backends_agree_and_reference_backend_is_the_reference() -> None:
    logits, targets = _selective_case(11, 97, torch.float32, seed=10)
    ref = selective_logprobs(logits, targets, backend="reference")
    assert torch.equal(ref, selective_logprobs_reference(logits, targets))
    auto = selective_logprobs(logits, targets)  # "auto": torch on CPU, Triton on CUDA
    assert _rel(auto, ref) < LOGP_REL_FP32


def test_selective_float64_torch_path_is_exact() -> None:
    logits, targets = _selective_case(13, 101, torch.float64, seed=11)
    logp, entropy = selective_logprobs(logits, targets, return_entropy=True, backend="torch")
    ref_logp, ref_ent = selective_logprobs_reference(logits, targets, return_entropy=True)
    assert logp.dtype == torch.float64
    assert _rel(logp, ref_logp) < 1e-12 and _rel(entropy, ref_ent) < 1e-12


# --------------------------------------------------------------------------------------
# fused_linear_logprobs
# --------------------------------------------------------------------------------------


def _fused_case(n: int, h: int, v: int, dtype: torch.dtype, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / h**0.5 * 2).to(dtype).to(DEVICE)
    b = torch.randn(v, generator=gen).to(dtype).to(DEVICE) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    return hidden, weight, b, targets


def _fused_ref(hidden, weight, bias, targets, temperature, g, g_h):
    leaves = [x.detach().double().requires_grad_(True) if x is not None else None
              for x in (hidden, weight, bias)]
    logp, entropy = fused_linear_logprobs_reference(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
        return_entropy=True,
    )
    _loss(logp, entropy, g, g_h).backward()
    return logp.detach(), entropy.detach(), [x.grad if x is not None else None for x in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_matches_reference_with_bias_entropy_and_gradients(backend, dtype) -> None:
    # H = 70 and V = 333 are not multiples of a block; 45 tokens in chunks of 16.
    n, h, v, temperature = 45, 70, 333, 1.3
    hidden, weight, bias, targets = _fused_case(n, h, v, dtype, seed=20, bias=True)
    g, g_h = _weights(n, seed=21)
    ref_logp, ref_ent, ref_grads = _fused_ref(hidden, weight, bias, targets, temperature, g, g_h)

    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    logp, entropy = fused_linear_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
        return_entropy=True, chunk_size=16, backend=backend,
    )
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    _check_values(logp, ref_logp, dtype)
    _check_values(entropy, ref_ent, dtype)
    assert (logp <= 0).all() and (entropy >= 0).all()
    _loss(logp, entropy, g, g_h).backward()
    for leaf, ref in zip(leaves, ref_grads):
        assert leaf.grad.dtype == dtype
        _check_grad(leaf.grad, ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_single_token_without_bias(backend) -> None:
    hidden, weight, _, targets = _fused_case(1, 17, 29, torch.float32, seed=22, bias=False)
    g, g_h = _weights(1, seed=23)
    ref_logp, ref_ent, ref_grads = _fused_ref(hidden, weight, None, targets, 1.0, g, g_h)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    logp, entropy = fused_linear_logprobs(
        leaves[0], leaves[1], targets, return_entropy=True, backend=backend
    )
    _check_values(logp, ref_logp, torch.float32)
    _check_values(entropy, ref_ent, torch.float32)
    _loss(logp, entropy, g, g_h).backward()
    for leaf, ref in zip(leaves, ref_grads[:2]):
        _check_grad(leaf.grad, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_frozen_weight_gives_hidden_gradient_only(backend) -> None:
    hidden, weight, bias, targets = _fused_case(20, 33, 130, torch.float32, seed=24, bias=True)
    g, _ = _weights(20, seed=25)
    _, _, ref_grads = _fused_ref(hidden, weight, bias, targets, 0.8, g, torch.zeros_like(g))
    leaf = hidden.clone().requires_grad_(True)
    logp = fused_linear_logprobs(
        leaf, weight, targets, bias=bias, temperature=0.8, chunk_size=7, backend=backend
    )
    (logp.double() * g.double()).sum().backward()
    assert weight.grad is None and bias.grad is None
    _check_grad(leaf.grad, ref_grads[0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_strided_views_match_reference(backend) -> None:
    # hidden: every other column of a wider buffer (row stride 2H, column stride 2);
    # weight: a transposed view (stride (1, V)). Neither is copied by the caller.
    n, h, v = 21, 24, 75
    hidden, weight, bias, targets = _fused_case(n, h, v, torch.float32, seed=40, bias=True)
    g, g_h = _weights(n, seed=41)
    ref_logp, ref_ent, ref_grads = _fused_ref(hidden, weight, bias, targets, 1.0, g, g_h)
    wide = torch.zeros(n, 2 * h, device=DEVICE)
    wide[:, ::2] = hidden
    h_leaf = wide.requires_grad_(True)
    w_leaf = weight.T.contiguous().requires_grad_(True)
    logp, entropy = fused_linear_logprobs(
        h_leaf[:, ::2], w_leaf.T, targets, bias=bias, return_entropy=True, chunk_size=8,
        backend=backend,
    )
    _check_values(logp, ref_logp, torch.float32)
    _check_values(entropy, ref_ent, torch.float32)
    _loss(logp, entropy, g, g_h).backward()
    _check_grad(h_leaf.grad[:, ::2], ref_grads[0], torch.float32)
    assert float(h_leaf.grad[:, 1::2].abs().max()) == 0.0
    _check_grad(w_leaf.grad.T, ref_grads[1], torch.float32)


def test_fused_kernel_copies_a_view_whose_stride_overflows_int32_tile_offsets() -> None:
    # A row stride of 2**25 elements: 128 rows * stride > 2**31, so the kernels' 32-bit
    # tile offsets would overflow; the launcher copies the view (spec: may copy,
    # says so). Only the touched pages of the 256 MiB buffer (fp32) are allocated.
    n, h, v = 3, 16, 40
    hidden, weight, _, targets = _fused_case(n, h, v, torch.float32, seed=42, bias=False)
    g, g_h = _weights(n, seed=43)
    ref_logp, ref_ent, ref_grads = _fused_ref(hidden, weight, None, targets, 1.0, g, g_h)
    strided = torch.empty_strided((n, h), (2**25, 1), device=DEVICE)
    strided.copy_(hidden)
    assert strided.stride(0) * 128 >= 2**31
    leaf = strided.requires_grad_(True)
    logp, entropy = fused_linear_logprobs(
        leaf, weight, targets, return_entropy=True, backend="triton"
    )
    _check_values(logp, ref_logp, torch.float32)
    _check_values(entropy, ref_ent, torch.float32)
    _loss(logp, entropy, g, g_h).backward()
    _check_grad(leaf.grad, ref_grads[0], torch.float32)


def test_fused_kernel_refuses_rows_too_long_for_its_tile_offsets_naming_the_argument() -> None:
    # Even contiguous, 128 rows of 2**24 elements overflow int32 offsets: a clear error
    # naming the argument instead of a wrong result (no real model is that wide).
    fit = _load_kernels().fused_linear_logprobs._fit_tile_offsets
    wide = torch.empty(1, 2**24, dtype=torch.uint8)
    with pytest.raises(ValueError, match="^hidden: rows of 16777216 elements"):
        fit(wide, 128, "hidden")
    narrow = torch.empty(4, 64)
    assert fit(narrow, 128, "hidden") is narrow  # nothing copied when the offsets fit


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_liger_fused_linear_cross_entropy(backend) -> None:
    # An independent public implementation: Liger's fused linear cross-entropy with
    # reduction="none" returns -log p(target) per token (its Triton kernels run on the
    # CPU interpreter too). Values and gradients to hidden and weight must agree.
    liger = pytest.importorskip(
        "liger_kernel.ops.fused_linear_cross_entropy",
        reason="liger-kernel is not installed (it is in the [test] extra)",
    ).LigerFusedLinearCrossEntropyFunction
    n, h, v = 19, 40, 150
    hidden, weight, _, targets = _fused_case(n, h, v, torch.float32, seed=44, bias=False)
    g, _ = _weights(n, seed=45)
    ours = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    theirs = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    logp = fused_linear_logprobs(ours[0], ours[1], targets, chunk_size=8, backend=backend)
    loss = liger.apply(theirs[0], theirs[1], targets, None, None, -100, 0.0, 0.0, "none")[0]
    assert loss.shape == (n,)
    _check_values(logp, -loss.detach(), torch.float32)
    (logp * g).sum().backward()
    (-loss * g).sum().backward()
    for mine, public in zip(ours, theirs):
        _check_grad(mine.grad, public.grad, torch.float32)


def test_fused_chunk_size_does_not_change_the_result() -> None:
    hidden, weight, bias, targets = _fused_case(23, 19, 61, torch.float64, seed=26, bias=True)
    outs = []
    for chunk in (1, 5, None):
        leaf = weight.clone().requires_grad_(True)
        logp = fused_linear_logprobs(
            hidden, leaf, targets, bias=bias, chunk_size=chunk, backend="torch"
        )
        logp.sum().backward()
        outs.append((logp.detach(), leaf.grad))
    ref = fused_linear_logprobs_reference(hidden, weight, targets, bias=bias)
    assert outs[0][0].dtype == torch.float64 and _rel(outs[0][0], ref) < 1e-12
    for logp, grad in outs[1:]:
        assert _rel(logp, outs[0][0]) < 1e-12 and _rel(grad, outs[0][1]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_kernel_gradient_matmuls_triton_and_torch_agree(dtype) -> None:
    # The two engines of the backward's gradient matmuls, one chunk and several (the
    # fp32 accumulation of a 16-bit weight gradient across chunks), against the float64
    # reference; in fp32 the engines also agree with each other to 1e-5.
    kernels = _load_kernels().fused_linear_logprobs
    hidden, weight, bias, targets = _fused_case(40, 24, 90, dtype, seed=27, bias=True)
    _, lse, entropy = kernels.fused_linear_logprobs_forward(
        hidden, weight, bias, targets, 1.0, num_splits=2
    )
    g, g_h = _weights(40, seed=28)
    _, _, ref_grads = _fused_ref(hidden, weight, bias, targets, 1.0, g, g_h)
    results = [
        kernels.fused_linear_logprobs_backward(
            hidden, weight, bias, targets, lse, entropy, g, g_h, 1.0,
            chunk_size=chunk, matmul_backend=engine,
        )
        for engine, chunk in (("triton", 40), ("torch", 40), ("triton", 13), ("torch", 13))
    ]
    for grads in results:
        for grad, ref in zip(grads, ref_grads):
            assert grad.dtype == dtype
            _check_grad(grad, ref, dtype)
    if dtype == torch.float32:
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert _rel(a, b) < 1e-5


def test_fused_kernel_is_deterministic() -> None:
    hidden, weight, bias, targets = _fused_case(33, 40, 150, torch.float32, seed=29, bias=True)
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        logp = fused_linear_logprobs(
            leaves[0], leaves[1], targets, bias=leaves[2], chunk_size=16, backend="triton"
        )
        logp.sum().backward()
        runs.append([logp.detach()] + [x.grad for x in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_selective_rejects_bad_arguments_naming_them() -> None:
    logits = torch.randn(4, 10)
    targets = torch.tensor([0, 1, 2, 3])
    with pytest.raises(TypeError, match="logits"):
        selective_logprobs(logits.tolist(), targets)
    with pytest.raises(TypeError, match="logits"):
        selective_logprobs(logits.long(), targets)
    with pytest.raises(ValueError, match="logits"):
        selective_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match="logits"):
        selective_logprobs(torch.randn(4, 0), targets)
    with pytest.raises(TypeError, match="targets"):
        selective_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="targets"):
        selective_logprobs(logits, targets[:3])
    with pytest.raises(ValueError, match="targets"):
        selective_logprobs(logits, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="targets"):
        selective_logprobs(logits, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="temperature"):
        selective_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        selective_logprobs(logits, targets, temperature=-1.0)
    with pytest.raises(TypeError, match="return_entropy"):
        selective_logprobs(logits, targets, return_entropy=1)
    with pytest.raises(ValueError, match="backend"):
        selective_logprobs(logits, targets, backend="cuda")
    with pytest.raises(TypeError, match="logits"):
        selective_logprobs(logits.double(), targets, backend="triton")


def test_temperature_has_a_floor_below_which_logits_would_overflow() -> None:
    """Below ``MIN_TEMPERATURE`` the scaled logits of ordinary (finite) inputs can pass
    the float32 range and the log-probs turn NaN: refused, naming ``temperature``. At
    the floor, logits far beyond any model's still give finite log-probs."""
    from riskfast.ops.logprobs import MIN_TEMPERATURE

    logits = torch.tensor([[10.0, -3.0, 2.5e34, 7.0], [1.0, 1.0, -2.0, 0.5]])
    targets = torch.tensor([0, 3])
    hidden, weight = torch.eye(4)[:2] * 3.0, torch.randn(5, 4)
    for tiny in (1e-40, 1e-30, MIN_TEMPERATURE / 2):
        with pytest.raises(ValueError, match="^temperature: must be >= 0.0001"):
            selective_logprobs(logits, targets, temperature=tiny)
        with pytest.raises(ValueError, match="^temperature"):
            fused_linear_logprobs(hidden, weight, targets[:2] % 5, temperature=tiny)
    # (before the floor, 1e-40 turned these finite logits into NaN log-probs)
    assert torch.isnan(torch.log_softmax(logits / 1e-40, dim=-1)).any()
    got = selective_logprobs(logits, targets, temperature=MIN_TEMPERATURE)
    assert torch.isfinite(got).all()
    want = torch.log_softmax(logits.double() / MIN_TEMPERATURE, dim=-1)
    assert torch.allclose(got.double(), want.gather(1, targets[:, None])[:, 0], rtol=1e-5)
    fused = fused_linear_logprobs(hidden, weight, targets[:2] % 5, temperature=MIN_TEMPERATURE)
    assert torch.isfinite(fused).all()


def test_fused_rejects_bad_arguments_naming_them() -> None:
    hidden, weight = torch.randn(3, 8), torch.randn(11, 8)
    targets = torch.tensor([0, 5, 10])
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprobs(hidden, torch.randn(11, 9), targets)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_logprobs(hidden[0], weight, targets)
    with pytest.raises(TypeError, match="weight"):
        fused_linear_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_logprobs(hidden, weight, targets, bias=torch.randn(10))
    with pytest.raises(TypeError, match="bias"):
        fused_linear_logprobs(hidden, weight, targets, bias=torch.randn(11).half())
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprobs(hidden, weight, torch.tensor([0, 5, 11]))
    with pytest.raises(TypeError, match="targets"):
        fused_linear_logprobs(hidden, weight, targets.bool())
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        fused_linear_logprobs(hidden, weight, targets, chunk_size=2.0)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, targets, temperature=float("inf"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight"):
            fused_linear_logprobs(hidden.cuda(), weight, targets.cuda())


def test_empty_batch_returns_empty_log_probs() -> None:
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    for backend in BACKENDS:
        logp = selective_logprobs(torch.randn(0, 5, device=DEVICE), none, backend=backend)
        assert logp.shape == (0,)
        logp = fused_linear_logprobs(torch.randn(0, 4, device=DEVICE),
                                     torch.randn(5, 4, device=DEVICE), none, backend=backend)
        assert logp.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_targets_are_accepted(backend) -> None:
    logits, targets = _selective_case(6, 40, torch.float32, seed=30)
    ref = selective_logprobs_reference(logits.double(), targets)
    _check_values(selective_logprobs(logits, targets.int(), backend=backend), ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_op_reads_the_device_once_forward_and_backward(backend) -> None:
    # The target range check is the only host read (one aminmax, read once); the
    # backward reads nothing. Counted by tests/host_reads.py's CPU proxy.
    logits, targets = _selective_case(8, 50, torch.float32, seed=31)
    leaf = logits.clone().requires_grad_(True)
    with HostReadCounter() as counter:
        logp, entropy = selective_logprobs(leaf, targets, return_entropy=True, backend=backend)
        forward_reads = counter.total
        (logp.sum() + entropy.sum()).backward()
    assert (forward_reads, counter.total) == (1, 1), dict(counter.reads)

    hidden, weight, bias, targets = _fused_case(8, 16, 50, torch.float32, seed=32, bias=True)
    leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    with HostReadCounter() as counter:
        logp = fused_linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend)
        forward_reads = counter.total
        logp.sum().backward()
    assert (forward_reads, counter.total) == (1, 1), dict(counter.reads)
