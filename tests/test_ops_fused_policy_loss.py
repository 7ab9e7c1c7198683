"""riskfast.ops.fused_linear_policy_loss against the plain loss on dense log-probs.

Spec: ``riskpo.md`` section 4 (the loss), ``spec/kernels.md`` (tolerances, never
``[N, V]``); issue 15. The oracle is written here with plain torch: ``[N, T, V]`` logits
``(hidden @ weight.T + bias) / temperature``, ``log_softmax``, ``gather`` and the entropy
``-sum p log p``, then the existing :func:`riskfast.riskpo.policy_loss` (which owns the
loss formula) and autograd; once in the inputs' dtype (fp32) and once in float64. The
chunked torch path is checked for every ``ratio_level``, ``agg``, KL, entropy, dual
clip, temperature and bias, with one chunk and many; the Triton path runs the same
cases on tiny shapes (under ``TRITON_INTERPRET=1`` on a CPU, set by ``conftest.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_device import DEVICE

from riskfast.ops import fused_linear_policy_loss
from riskfast.riskpo import policy_loss

REPO = Path(__file__).resolve().parents[1]
LEVELS = ("token", "sequence")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# The CPU interpreter evaluates both sides of every tl.where, also on masked lanes.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

# spec/kernels.md, fp32 inputs: rel. error < 1e-5 on values, < 1e-4 on gradients.
VALUE_REL, GRAD_REL = 1e-5, 1e-4


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------
# Inputs and the oracle
# --------------------------------------------------------------------------------------


def _case(
    n: int = 4,
    t: int = 6,
    h: int = 5,
    v: int = 13,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    token_advantages: bool = False,
    device: torch.device | str = "cpu",
) -> dict:
    """Inputs with ragged responses (one empty), padding holding garbage, ratios off 1."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    bias_v = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    lengths = [(t - 1 - 2 * i) % (t + 1) for i in range(n)]
    lengths[min(1, n - 1)] = t  # one full response
    if n > 2:
        lengths[2] = 0  # one response without a token
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    targets = torch.randint(0, v, (n, t), generator=gen)
    targets[~mask] = -100  # padding ids outside [0, V)
    # old/ref log-probs near the current ones, so that some tokens clip and some not
    with torch.no_grad():
        logp, _ = _dense_logp(hidden, weight, bias_v, targets.clamp_min(0), 1.0)
    old_logp = logp + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    ref_logp = logp + 0.5 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    old_logp[~mask] = float("nan")  # padding is ignored, whatever it holds
    ref_logp[~mask] = float("inf")
    shape = (n, t) if token_advantages else (n,)
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)

    def cast(x):
        return None if x is None else x.to(device=device, dtype=dtype)

    return {
        "hidden": cast(hidden),
        "weight": cast(weight),
        "bias": cast(bias_v),
        "targets": targets.to(device),
        "old_logp": cast(old_logp),
        "advantages": cast(advantages),
        "mask": mask.to(device),
        "ref_logp": cast(ref_logp),
    }


def _dense_logp(hidden, weight, bias, targets, temperature):
    """Plain torch: ``[N, T, V]`` logits, log-softmax, the target's log-prob, the entropy."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    log_p = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_p.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def _options(level, agg, *, kl=True, entropy=True, dual=True, temperature=0.8, **extra):
    options = {
        "ratio_level": level,
        "agg": agg,
        "eps_low": 0.2,
        "eps_high": 0.28,
        "dual_clip": 3.0 if dual else None,
        "beta_kl": 0.1 if kl else 0.0,
        "entropy_coef": 0.05 if entropy else 0.0,
        "temperature": temperature,
    }
    if agg == "seq-mean-token-sum-norm":
        options["max_len"] = 9
    options.update(extra)
    return options


def _leaves(case: dict, dtype: torch.dtype | None = None) -> dict:
    out = {}
    for name in ("hidden", "weight", "bias"):
        x = case[name]
        if x is not None:
            x = x.detach().clone()
            if dtype is not None:
                x = x.to(dtype)
            x.requires_grad_(True)
        out[name] = x
    return out


def _oracle(case: dict, options: dict, dtype: torch.dtype | None = None, on_policy=False):
    """Loss, metrics and gradients of ``policy_loss`` on plain dense log-probs."""
    leaves = _leaves(case, dtype)
    cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.to(dtype))
    options = dict(options)
    temperature = options.pop("temperature", 1.0)
    safe_targets = case["targets"].clamp_min(0)
    logp, entropy = _dense_logp(
        leaves["hidden"], leaves["weight"], leaves["bias"], safe_targets, temperature
    )
    with_entropy = options.get("entropy_coef", 0.0) != 0 or options.pop("compute_entropy", False)
    loss, metrics = policy_loss(
        logp,
        logp.detach() if on_policy else cast(case["old_logp"]),
        cast(case["advantages"]),
        case["mask"],
        ref_logp=cast(case["ref_logp"]) if options.get("beta_kl", 0.0) > 0 else None,
        entropy=entropy if with_entropy else None,
        **options,
    )
    loss.backward()
    grads = {k: None if x is None else x.grad for k, x in leaves.items()}
    return loss.detach(), metrics, grads, logp.detach()


def _fused(case: dict, options: dict, on_policy=False, **kwargs):
    leaves = _leaves(case)
    options = dict(options)
    if options.get("beta_kl", 0.0) > 0:
        options["ref_logp"] = case["ref_logp"]
    loss, metrics = fused_linear_policy_loss(
        leaves["hidden"],
        leaves["weight"],
        case["targets"],
        None if on_policy else case["old_logp"],
        case["advantages"],
        case["mask"],
        bias=leaves["bias"],
        **options,
        **kwargs,
    )
    loss.backward()
    grads = {k: None if x is None else x.grad for k, x in leaves.items()}
    return loss.detach(), metrics, grads


def _assert_close(got, want, value_rel=VALUE_REL, grad_rel=GRAD_REL):
    loss, metrics, grads = got[:3]
    ref_loss, ref_metrics, ref_grads = want[:3]
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(ref_loss)) <= value_rel * max(1.0, abs(float(ref_loss)))
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        assert abs(metrics[name] - value) <= value_rel * max(1.0, abs(value)), name
    for name, ref in ref_grads.items():
        if ref is None:
            assert grads[name] is None
            continue
        assert grads[name].dtype == ref.dtype if ref.dtype != torch.float64 else True
        assert torch.isfinite(grads[name]).all(), name
        assert _rel(grads[name], ref) < grad_rel, (name, _rel(grads[name], ref))


# --------------------------------------------------------------------------------------
# The torch path: every option, one chunk and many
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 4, None], ids=["chunk1", "chunk4", "one-chunk"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("level", LEVELS)
def test_torch_path_equals_dense_policy_loss_for_every_level_and_agg(level, agg, chunk_size):
    # chunk 4 < the longest response (6): the sequence ratio takes its two-pass branch
    # for that response and the one-pass branch for the shorter ones.
    case = _case()
    options = _options(level, agg)
    got = _fused(case, options, chunk_size=chunk_size, backend="torch")
    _assert_close(got, _oracle(case, options))


@pytest.mark.parametrize(
    "flags",
    [
        {"kl": False, "entropy": False, "dual": False, "temperature": 1.0},
        {"kl": True, "entropy": False, "dual": False, "temperature": 1.0},
        {"kl": False, "entropy": True, "dual": False, "temperature": 1.3},
        {"kl": False, "entropy": False, "dual": True, "temperature": 0.5},
        {"kl": False, "entropy": False, "dual": False, "temperature": 1.0, "compute_entropy": True},
    ],
    ids=["plain", "kl", "entropy", "dual-clip", "entropy-metric-only"],
)
@pytest.mark.parametrize("level", LEVELS)
def test_torch_path_each_option_alone(level, flags):
    case = _case(seed=3, bias=False)
    options = _options(level, "seq-mean-token-mean", **flags)
    got = _fused(case, options, chunk_size=5, backend="torch")
    want = _oracle(case, options)
    _assert_close(got, want)
    assert ("entropy" in got[1]) == (flags["entropy"] or "compute_entropy" in flags)


@pytest.mark.parametrize("level", LEVELS)
def test_float64_inputs_match_the_float64_oracle_and_fp32_is_within_tolerance(level):
    case64 = _case(seed=5, dtype=torch.float64, token_advantages=True)
    options = _options(level, "token-mean")
    want = _oracle(case64, options)
    got64 = _fused(case64, options, chunk_size=3, backend="torch")
    assert got64[0].dtype == torch.float64
    _assert_close(got64, want, value_rel=1e-12, grad_rel=1e-10)
    # fp32 inputs (the same values rounded) against the float64 oracle on those values
    case32 = {k: v.float() if v is not None and v.is_floating_point() else v
              for k, v in case64.items()}  # fmt: skip
    want32 = _oracle(case32, options, dtype=torch.float64)
    _assert_close(_fused(case32, options, chunk_size=3, backend="torch"), want32)


@pytest.mark.parametrize("level", LEVELS)
def test_on_policy_none_old_logp_equals_detached_current_logp(level):
    case = _case(seed=7)
    options = _options(level, "token-mean", kl=False)
    got = _fused(case, options, on_policy=True, chunk_size=4, backend="torch")
    _assert_close(got, _oracle(case, options, on_policy=True))
    assert got[1]["ratio_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (1, 7, 3, 2), (5, 1, 4, 29), (2, 9, 1, 17)],
    ids=["all-ones", "N=1", "T=1", "H=1"],
)  # fmt: skip
@pytest.mark.parametrize("level", LEVELS)
def test_odd_shapes(level, shape):
    n, t, h, v = shape
    case = _case(n, t, h, v, seed=11)
    options = _options(level, "seq-mean-token-sum")
    for chunk_size in (1, 2, None):
        got = _fused(case, options, chunk_size=chunk_size, backend="torch")
        _assert_close(got, _oracle(case, options))


def test_per_token_advantages_and_token_weights():
    case = _case(seed=13, token_advantages=True)
    weights = torch.rand(case["mask"].shape, generator=torch.Generator().manual_seed(0))
    options = _options("token", "token-mean", token_weights=weights)
    _assert_close(_fused(case, options, chunk_size=2, backend="torch"), _oracle(case, options))
    options = _options("sequence", "token-mean", token_weights=weights[:, 0])
    _assert_close(_fused(case, options, chunk_size=2, backend="torch"), _oracle(case, options))


def test_num_items_is_the_normaliser_of_every_chunk():
    case = _case(seed=17)
    options = _options("token", "token-mean", num_items=37.0)
    _assert_close(_fused(case, options, chunk_size=3, backend="torch"), _oracle(case, options))


def test_reference_backend_equals_the_oracle():
    case = _case(seed=19)
    options = _options("sequence", "seq-mean-token-mean")
    _assert_close(_fused(case, options, backend="reference"), _oracle(case, options))


def test_return_logp_gives_the_detached_log_probs_and_zero_padding():
    case = _case(seed=23)
    options = _options("token", "token-mean", kl=False)
    leaves = _leaves(case)
    _, _, logp = fused_linear_policy_loss(
        leaves["hidden"], leaves["weight"], case["targets"], case["old_logp"],
        case["advantages"], case["mask"], bias=leaves["bias"], return_logp=True,
        chunk_size=3, backend="torch", **options,
    )  # fmt: skip
    want_logp = _oracle(case, options)[3]
    assert not logp.requires_grad
    assert torch.equal(logp[~case["mask"]], torch.zeros_like(logp[~case["mask"]]))
    assert _rel(logp[case["mask"]], want_logp[case["mask"]]) < VALUE_REL


# --------------------------------------------------------------------------------------
# Autograd behaviour
# --------------------------------------------------------------------------------------


def test_upstream_gradient_scales_the_precomputed_gradients():
    case = _case(seed=29)
    options = _options("sequence", "token-mean")
    want = _oracle(case, options)
    leaves = _leaves(case)
    loss, _ = fused_linear_policy_loss(
        leaves["hidden"], leaves["weight"], case["targets"], case["old_logp"],
        case["advantages"], case["mask"], bias=leaves["bias"], ref_logp=case["ref_logp"],
        chunk_size=2, backend="torch", **options,
    )  # fmt: skip
    (-2.5 * loss + 1.0).backward()
    for name in ("hidden", "weight", "bias"):
        assert _rel(leaves[name].grad, -2.5 * want[2][name]) < GRAD_REL


def test_a_second_backward_through_one_call_raises():
    case = _case(seed=31)
    leaves = _leaves(case)
    loss, _ = fused_linear_policy_loss(
        leaves["hidden"], leaves["weight"], case["targets"], case["old_logp"],
        case["advantages"], case["mask"], backend="torch",
    )  # fmt: skip
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_only_inputs_that_require_grad_get_one_and_no_grad_mode_gives_the_same_loss():
    case = _case(seed=37)
    options = _options("token", "seq-mean-token-mean")
    want = _oracle(case, options)
    hidden = case["hidden"].clone().requires_grad_(True)
    loss, metrics = fused_linear_policy_loss(
        hidden, case["weight"], case["targets"], case["old_logp"], case["advantages"],
        case["mask"], bias=case["bias"], ref_logp=case["ref_logp"], chunk_size=4,
        backend="torch", **options,
    )  # fmt: skip
    loss.backward()
    assert _rel(hidden.grad, want[2]["hidden"]) < GRAD_REL
    assert case["weight"].grad is None
    with torch.no_grad():
        loss_ng, metrics_ng = fused_linear_policy_loss(
            hidden, case["weight"], case["targets"], case["old_logp"], case["advantages"],
            case["mask"], bias=case["bias"], ref_logp=case["ref_logp"], chunk_size=4,
            backend="torch", **options,
        )  # fmt: skip
    assert not loss_ng.requires_grad
    assert float(loss_ng) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert metrics_ng == pytest.approx(metrics, rel=1e-6)


def test_inputs_are_not_mutated():
    case = _case(seed=41)
    leaves = _leaves(case)
    before = {k: v.detach().clone() for k, v in case.items() if v is not None}
    before.update({k: v.detach().clone() for k, v in leaves.items()})
    options = _options("sequence", "token-mean")
    loss, _ = fused_linear_policy_loss(
        leaves["hidden"], leaves["weight"], case["targets"], case["old_logp"],
        case["advantages"], case["mask"], bias=leaves["bias"], ref_logp=case["ref_logp"],
        chunk_size=2, backend="torch", **options,
    )  # fmt: skip
    (3.0 * loss).backward()
    after = {**{k: v for k, v in case.items() if v is not None}, **leaves}
    for name, value in before.items():
        assert torch.equal(value.isnan(), after[name].isnan()), name
        assert torch.equal(value.nan_to_num(), after[name].detach().nan_to_num()), name


# --------------------------------------------------------------------------------------
# Numerical contract: finite in, finite out
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_finite_extreme_inputs_never_give_nan(level):
    case = _case(seed=43)
    case["hidden"] = case["hidden"] * 300.0  # logits in the thousands
    case["old_logp"] = torch.where(case["mask"], case["old_logp"] - 500.0, case["old_logp"])
    case["advantages"] = case["advantages"] * 1e6
    options = _options(level, "seq-mean-token-sum", temperature=0.05)
    loss, metrics, grads = _fused(case, options, chunk_size=3, backend="torch")
    assert torch.isfinite(loss)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_no_response_token_gives_loss_zero_and_zero_gradients():
    case = _case(seed=47)
    case["mask"] = torch.zeros_like(case["mask"])
    case["targets"] = torch.full_like(case["targets"], -1)
    for level in LEVELS:
        loss, _, grads = _fused(case, _options(level, "token-mean"), backend="torch")
        assert float(loss) == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_empty_time_axis():
    case = _case(n=3, t=1, seed=53)
    for name in ("hidden",):
        case[name] = case[name][:, :0]
    for name in ("targets", "old_logp", "mask", "ref_logp"):
        case[name] = case[name][:, :0]
    loss, _, grads = _fused(case, _options("sequence", "token-mean"), backend="torch")
    assert float(loss) == 0.0 and grads["hidden"].shape == (3, 0, 5)


# --------------------------------------------------------------------------------------
# Validation: ValueError / TypeError naming the argument, before anything changes
# --------------------------------------------------------------------------------------


BAD_INPUTS = [
    ("hidden", TypeError, lambda c: {"hidden": c["hidden"].long()}),
    ("hidden", ValueError, lambda c: {"hidden": c["hidden"][0]}),
    ("weight", ValueError, lambda c: {"weight": c["weight"][:, :-1]}),
    ("weight", TypeError, lambda c: {"weight": c["weight"].double()}),
    ("weight", TypeError, lambda c: {"weight": c["weight"].tolist()}),
    ("bias", ValueError, lambda c: {"bias": c["bias"][:-1]}),
    ("bias", TypeError, lambda c: {"bias": c["bias"].double()}),
    ("targets", TypeError, lambda c: {"targets": c["targets"].float()}),
    ("targets", ValueError, lambda c: {"targets": c["targets"][:, :-1]}),
    ("targets", ValueError, lambda c: {"targets": torch.where(c["mask"], 13, c["targets"])}),
    ("targets", ValueError, lambda c: {"targets": torch.where(c["mask"], -1, c["targets"])}),
    ("old_logp", ValueError, lambda c: {"old_logp": c["old_logp"][:-1]}),
    ("old_logp", ValueError,
     lambda c: {"old_logp": torch.where(c["mask"], float("nan"), c["old_logp"])}),
    ("mask", ValueError, lambda c: {"mask": c["mask"][:, 1:]}),
    ("advantages", ValueError, lambda c: {"advantages": c["advantages"][:-1]}),
    ("advantages", ValueError,
     lambda c: {"advantages": torch.full_like(c["advantages"], float("inf"))}),
    ("ref_logp", ValueError, lambda c: {"beta_kl": 0.1, "ref_logp": None}),
    ("ref_logp", ValueError, lambda c: {"beta_kl": 0.1, "ref_logp": c["ref_logp"][:, 1:]}),
    ("ratio_level", ValueError, lambda c: {"ratio_level": "tokens"}),
    ("agg", ValueError, lambda c: {"agg": "mean"}),
    ("eps_low", ValueError, lambda c: {"eps_low": -0.1}),
    ("dual_clip", ValueError, lambda c: {"dual_clip": 0.5}),
    ("beta_kl", ValueError, lambda c: {"beta_kl": -1.0}),
    ("max_len", ValueError, lambda c: {"max_len": 4}),
    ("num_items", ValueError, lambda c: {"num_items": 0.0}),
    ("temperature", ValueError, lambda c: {"temperature": 0.0}),
    ("chunk_size", ValueError, lambda c: {"chunk_size": 0}),
    ("chunk_size", TypeError, lambda c: {"chunk_size": 2.5}),
    ("compute_entropy", TypeError, lambda c: {"compute_entropy": "yes"}),
    ("backend", ValueError, lambda c: {"backend": "cuda"}),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, error, change", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_raises_naming_the_argument_before_anything_changes(name, error, change):
    case = _case(seed=59)
    leaves = _leaves(case)
    args = {
        "hidden": leaves["hidden"], "weight": leaves["weight"], "targets": case["targets"],
        "old_logp": case["old_logp"], "advantages": case["advantages"], "mask": case["mask"],
        "bias": leaves["bias"], "ref_logp": case["ref_logp"],
    }  # fmt: skip
    args["backend"] = "torch"
    args.update(change({**case, **leaves}))
    before = {k: v.detach().clone() for k, v in leaves.items()}
    with pytest.raises(error, match=name):
        fused_linear_policy_loss(**args)
    for key, value in leaves.items():
        assert value.grad is None
        assert torch.equal(value.detach(), before[key])


# --------------------------------------------------------------------------------------
# The Triton path (interpreter on a CPU), same dispatcher
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level, agg, chunk_size",
    [("token", "token-mean", 3), ("sequence", "seq-mean-token-mean", 4),
     ("sequence", "seq-mean-token-sum-norm", None), ("token", "seq-mean-token-sum", 1)],
)  # fmt: skip
def test_triton_path_equals_dense_policy_loss(level, agg, chunk_size):
    case = _case(seed=61, device=DEVICE)
    options = _options(level, agg)
    got = _fused(case, options, chunk_size=chunk_size, backend="triton")
    _assert_close(got, _oracle(case, options))


def test_auto_backend_is_triton_on_cuda_and_torch_elsewhere(monkeypatch):
    from riskfast.ops import fused_policy_loss

    seen = []
    original = fused_policy_loss._CHUNKS.copy()

    def spy(name):
        class Spy(original[name]):
            def __init__(self, *args):
                seen.append(name)
                super().__init__(*args)

        return Spy

    monkeypatch.setattr(fused_policy_loss, "_CHUNKS", {k: spy(k) for k in original})
    case = _case(seed=67, device=DEVICE)
    _fused(case, _options("token", "token-mean"), backend="auto")
    assert seen == ["triton" if DEVICE.type == "cuda" else "torch"]


# --------------------------------------------------------------------------------------
# Memory: O(chunk x V), never [N, V]
# --------------------------------------------------------------------------------------

_MEMORY_CHILD = r"""
import json, sys
import torch
from riskfast.ops import fused_linear_policy_loss
from riskfast.riskpo import policy_loss

variant = sys.argv[1]
B, T, H, V = 8, 128, 64, 32768
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(B, T, H, generator=gen).requires_grad_(True)
weight = torch.randn(V, H, generator=gen).mul_(H ** -0.5).requires_grad_(True)
targets = torch.randint(0, V, (B, T), generator=gen)
old_logp = torch.full((B, T), -10.0)
advantages = torch.randn(B, generator=gen)
mask = torch.ones(B, T, dtype=torch.bool)


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
if variant == "dense":
    logits = hidden.reshape(B * T, H) @ weight.T
    logp = torch.log_softmax(logits, -1).gather(1, targets.reshape(-1, 1)).view(B, T)
    del logits
    loss, _ = policy_loss(logp, old_logp, advantages, mask, ratio_level="sequence")
else:
    loss, _ = fused_linear_policy_loss(hidden, weight, targets, old_logp, advantages, mask,
                                       ratio_level="sequence", chunk_size=128, backend="torch")
loss.backward()
print(json.dumps({"peak_extra": status("VmHWM") - before, "loss": float(loss.detach())}))
"""


def _peak(variant: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, variant],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_torch_path_peak_memory_is_under_a_quarter_of_the_dense_loss():
    # N = 1024 tokens, V = 32768: the dense loss holds [N, V] fp32 logits (128 MiB) and
    # their log-softmax; the fused path two [128, V] buffers (16 MiB each) and the
    # [V, H] gradient (8 MiB).
    dense, fused = _peak("dense"), _peak("fused")
    assert dense["peak_extra"] > 1024 * 32768 * 4
    assert fused["peak_extra"] < dense["peak_extra"] / 4, (fused, dense)
    assert fused["loss"] == pytest.approx(dense["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("n", "v", "entropy_grad", "expected"),
    [
        (1024, 32000, False, 262),  # the 32 MiB budget: 33,554,432 // (4 * 32,000)
        (10, 32000, False, 262),  # larger than the batch: one chunk holds all 10
        (1024, 32000, True, 256),  # two buffers with an entropy gradient: 131 < 256 tokens
        (512, 128256, False, 256),  # at least 256 tokens (125 MiB)
        (512, 128256, True, 256),  # 250 MiB with the entropy's second buffer
        (256, 1_000_000, False, 67),  # 256 tokens would exceed 256 MiB: 268,435,456 // 4e6
        (4, 10**9, False, 1),  # never below one token
    ],
)  # fmt: skip
def test_default_torch_chunk(n, v, entropy_grad, expected):
    from riskfast.ops.fused_policy_loss import _TorchChunks

    chunks = _TorchChunks.__new__(_TorchChunks)  # default_chunk reads no state
    assert chunks.default_chunk(n, v, entropy_grad) == expected
