"""``backend="triton"`` runs exactly where Triton can run the kernels, and says so otherwise.

Triton decides when it defines a ``@triton.jit`` function whether the function runs
compiled or on its CPU interpreter, from ``TRITON_INTERPRET`` as Triton reads it ("1",
"true", "on", "yes", "y" in any case for Triton 3.9). riskfast asks its kernels rather
than re-reading the variable, so the three places that care agree with Triton:

* the ops' device guard (``riskfast.ops._kernels.require_triton``) behind every forced
  ``backend="triton"``: ``selective_logprobs``, ``fused_linear_logprobs``,
  ``riskpo.advantages``;
* the launchers' CPU configuration (small tiles, fp32 dot operands: the interpreter's
  bf16 arithmetic is wrong);
* ``build_info()["triton_interpret"]``.

Each case runs in a fresh process, since the mode is fixed at the kernels' import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is not installed: there is no kernel to guard")

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from riskfast._extension import build_info

    out = {"info_before_import": build_info()["triton_interpret"]}
    from riskfast.ops import (
        fused_linear_logprobs, fused_linear_logprobs_reference,
        selective_logprobs, selective_logprobs_reference,
    )
    from riskfast.ops._kernels import load_kernels
    from riskfast.riskpo import advantages

    kernels = load_kernels()
    out["is_interpreting"] = kernels.is_interpreting()
    out["info_after_import"] = build_info()["triton_interpret"]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 37, generator=gen)
    targets = torch.randint(0, 37, (5,), generator=gen)
    hidden = torch.randn(6, 40, generator=gen).bfloat16()
    weight = torch.randn(37, 40, generator=gen).mul(0.3).bfloat16()
    fused_targets = torch.randint(0, 37, (6,), generator=gen)
    rewards = torch.rand(20, generator=gen)

    calls = {
        "selective_logprobs": lambda: selective_logprobs(logits, targets, backend="triton"),
        "fused_linear_logprobs": lambda: fused_linear_logprobs(
            hidden, weight, fused_targets, backend="triton"),
        "advantages": lambda: advantages(
            rewards, group_size=4, backend="triton", shuffle=False).advantages,
    }

    def attempt():
        result = {}
        for name, call in calls.items():
            try:
                value = call()
            except Exception as err:  # reported to the test, which asserts on it
                result[name] = {"error": type(err).__name__, "message": str(err)}
            else:
                result[name] = {"value": value.double().tolist()}
        return result

    out["calls"] = attempt()
    # Setting the variable once the kernels are defined changes nothing (Triton read it).
    os.environ["TRITON_INTERPRET"] = "1"
    out["calls_after_setting"] = attempt()
    out["info_after_setting"] = build_info()["triton_interpret"]
    out["reference"] = {
        "selective_logprobs": selective_logprobs_reference(
            logits.double(), targets).tolist(),
        # float64 on the same bf16 values (spec/kernels.md, bf16 tolerance)
        "fused_linear_logprobs": fused_linear_logprobs_reference(
            hidden.double(), weight.double(), fused_targets).tolist(),
        "advantages": advantages(
            rewards.double(), group_size=4, backend="torch", shuffle=False
        ).advantages.tolist(),
    }
    print(json.dumps(out))
    """
)


def _run_child(interpret: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled_mode() -> dict:
    """A process whose kernels were defined without TRITON_INTERPRET (compiled mode)."""
    return _run_child(None)


@pytest.fixture(scope="module")
def interpreted_mode() -> dict:
    """A process with TRITON_INTERPRET=Y: on for Triton, though not spelled "1"."""
    return _run_child("Y")


OPS = ("selective_logprobs", "fused_linear_logprobs", "advantages")


def test_compiled_kernels_report_that_they_are_not_interpreted(compiled_mode):
    assert compiled_mode["is_interpreting"] is False
    assert compiled_mode["info_before_import"] is False
    assert compiled_mode["info_after_import"] is False


@pytest.mark.parametrize("op", OPS)
def test_forced_triton_on_cpu_without_interpreter_names_backend_and_the_fix(compiled_mode, op):
    # Before: advantages died inside Triton ("0 active drivers"), with no word of the fix.
    outcome = compiled_mode["calls"][op]
    assert outcome.get("error") == "RuntimeError", outcome
    assert outcome["message"].startswith("backend: 'triton' on a cpu tensor"), outcome
    assert "TRITON_INTERPRET=1" in outcome["message"], outcome
    assert "backend='torch'" in outcome["message"], outcome


@pytest.mark.parametrize("op", OPS)
def test_setting_the_variable_after_the_import_is_refused_the_same_way(compiled_mode, op):
    # Before: the logprob guard read the variable, let the call through, and the launch
    # failed inside Triton.
    outcome = compiled_mode["calls_after_setting"][op]
    assert outcome.get("error") == "RuntimeError", outcome
    assert "before riskfast.kernels is first imported" in outcome["message"], outcome
    assert compiled_mode["info_after_setting"] is False


def test_a_spelling_triton_reads_as_on_runs_the_interpreter(interpreted_mode):
    assert interpreted_mode["info_before_import"] is True
    assert interpreted_mode["is_interpreting"] is True
    assert interpreted_mode["info_after_import"] is True


@pytest.mark.parametrize(("op", "tolerance"), [
    ("selective_logprobs", 1e-5),  # fp32 input
    ("fused_linear_logprobs", 1e-3),  # bf16 input, the spec's bf16 log-prob bound
    ("advantages", 1e-5),
])
def test_interpreted_kernels_match_the_float64_reference(interpreted_mode, op, tolerance):
    # Before: "Y" passed neither the logprob guard (it read "1" and "true" only) nor the
    # launchers' check, which then fed bf16 operands to the interpreter's wrong bf16 dot.
    outcome = interpreted_mode["calls"][op]
    assert "value" in outcome, outcome
    got, want = outcome["value"], interpreted_mode["reference"][op]
    assert len(got) == len(want)
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    scale = max(1.0, max(abs(b) for b in want)) if op != "fused_linear_logprobs" else 1.0
    assert worst <= tolerance * scale, f"{op}: max abs error {worst:.3g} > {tolerance * scale:.3g}"
