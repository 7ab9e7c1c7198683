"""Every ```python block of README.md runs in the suite, so the README cannot drift.

The convention, for every block whoever writes it:

* A block runs as written on a CPU, on its own: a fresh namespace, the working
  directory a new temporary folder (so ``output_dir="out"`` or ``torch.save(...,
  "x.pt")`` are fine), ``HF_HUB_OFFLINE=1`` (no download).
* A block that uses objects it does not build (a model, a dataset, logits...) names
  them in a comment line of the block::

      # assumes: model, tokenizer (a causal LM, its tokenizer), dataset, reward_fn

  Each comma-separated item starts with the name; text in parentheses describes it and
  is ignored. The suite fills every assumed name with a tiny stand-in from
  ``STAND_INS`` below before running the block. A name without a stand-in fails the
  test, naming the block's line: add a factory to ``STAND_INS`` (or build the object
  in the block).
* A failure is reported at the README's own line numbers (the block is compiled as
  ``README.md`` with its lines in place), and the test id is ``README.md:<line>``.

Blocks in other languages (bash, text) are not run. Every ``riskfast`` command of a bash
block is parsed and validated as the command line would (``riskfast demo`` and
``riskfast study`` through their option checks), without training anything, so a
renamed or removed flag in a README command fails the suite.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
ASSUMES = re.compile(r"^\s*#\s*assumes:\s*(.+)$")


def python_blocks(text: str, language: str = "python") -> list[tuple[int, str]]:
    """``(first code line, code)`` of every ```python block (line numbers from 1), or of
    every block in ``language``."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    inside: str | None = None
    start, body = 0, []
    for number, line in enumerate(lines, start=1):
        match = FENCE.match(line)
        if inside is None:
            if match:
                inside, start, body = match.group(1), number + 1, []
        elif line.strip() == "```":
            if inside == language:
                blocks.append((start, "\n".join(body) + "\n"))
            inside = None
        else:
            body.append(line)
    return blocks


def assumed_names(code: str) -> list[str]:
    """The names a block declares with ``# assumes: a (what), b, ...``."""
    names: list[str] = []
    for line in code.splitlines():
        match = ASSUMES.match(line)
        if not match:
            continue
        text = match.group(1)
        while True:  # drop (descriptions), nested ones included
            shorter = re.sub(r"\([^()]*\)", "", text)
            if shorter == text:
                break
            text = shorter
        for item in text.split(","):
            word = re.match(r"\s*([A-Za-z_]\w*)", item)
            if word:
                names.append(word.group(1))
    return names


# ------------------------------------------------------------------- stand-ins
def _token_kit() -> dict[str, Any]:
    """Logits [6, 11] and their targets; hidden states [6, 8] and an LM head Linear(8, 11)."""
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.nn.Linear(8, 11, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(11, 8, generator=gen) * 0.3)
    return {
        "logits": torch.randn(6, 11, generator=gen, requires_grad=True),
        "targets": torch.randint(0, 11, (6,), generator=gen),
        "hidden": torch.randn(6, 8, generator=gen, requires_grad=True),
        "lm_head": lm_head,
    }


def _language_kit() -> dict[str, Any]:
    """The demo's character tokenizer and its tiny Qwen2 (21k parameters, no download),
    one addition prompt, and a reward that varies across samples."""
    from datasets import Dataset

    from riskfast.demo.task import build_model, build_tokenizer, sample_questions

    tokenizer = build_tokenizer()
    questions = sample_questions(1, "train", seed=0)

    def reward_fn(completions: list[str], **_: Any) -> list[float]:
        return [float(len(c) % 2) for c in completions]

    return {
        "tokenizer": tokenizer,
        "model": build_model(tokenizer, "tiny", seed=0),
        "dataset": Dataset.from_list([{"prompt": q.prompt} for q in questions]),
        "reward_fn": reward_fn,
    }


STAND_INS: dict[str, Callable[[], dict[str, Any]]] = {
    **dict.fromkeys(("logits", "targets", "hidden", "lm_head"), _token_kit),
    **dict.fromkeys(("model", "tokenizer", "dataset", "reward_fn"), _language_kit),
}
"""Assumed name -> the kit that builds it (kits build related objects together)."""


def stand_ins(names: list[str], line: int) -> dict[str, Any]:
    missing = [n for n in names if n not in STAND_INS]
    if missing:
        pytest.fail(
            f"README.md:{line}: the block assumes {missing}, which have no stand-in in "
            f"tests/test_readme_snippets.py (known: {sorted(STAND_INS)}); add one to STAND_INS"
        )
    namespace: dict[str, Any] = {}
    for kit in dict.fromkeys(STAND_INS[n] for n in names):
        namespace.update(kit())
    return {n: namespace[n] for n in names}


# ----------------------------------------------------------------------- tests
BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_the_extraction_finds_them() -> None:
    # Guards the parametrisation below against silently running nothing.
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n# assumes: a (one), b\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "# assumes: a (one), b\n")]
    assert assumed_names("# assumes: lm_head (a Linear(H, V)), targets (N)\n") == [
        "lm_head",
        "targets",
    ]
    codes = [code for _, code in BLOCKS]
    assert any("from riskfast.riskpo import advantages" in code for code in codes)
    assert any("RiskPOTrainer" in code for code in codes)


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    namespace: dict[str, Any] = {"__name__": f"readme_line_{line}"}
    namespace.update(stand_ins(assumed_names(code), line))
    # Compiled as README.md with blank lines in front: tracebacks show README line numbers.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    torch.manual_seed(0)
    try:
        exec(compiled, namespace)  # noqa: S102 - running the README is the point
    except Exception as err:
        raise AssertionError(
            f"README.md:{line}: the python block starting there failed with "
            f"{type(err).__name__}: {err}"
        ) from err
    assert os.getcwd() == str(tmp_path)


def riskfast_commands(text: str) -> list[tuple[int, list[str]]]:
    """``(line, argv after "riskfast")`` of every ``riskfast`` command in the bash blocks:
    continuation lines joined, ``&&``-chains split, comments dropped."""
    import shlex

    commands: list[tuple[int, list[str]]] = []
    for start, code in python_blocks(text, "bash"):
        lines = code.splitlines()
        number = 0
        while number < len(lines):
            first, joined = start + number, lines[number]
            while joined.endswith("\\") and number + 1 < len(lines):
                number += 1
                joined = joined[:-1] + " " + lines[number]
            number += 1
            for part in joined.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0].endswith("bin/riskfast"):
                    commands.append((first, words[1:]))
    return commands


README_COMMANDS = riskfast_commands(README.read_text())


def test_readme_riskfast_commands_are_found() -> None:
    text = "```bash\nbash x.sh && .venv/bin/riskfast demo --quick\n.venv/bin/riskfast study \\\n  --seeds 0 1 # c\n```\n"
    assert riskfast_commands(text) == [(2, ["demo", "--quick"]), (3, ["study", "--seeds", "0", "1"])]
    names = [argv[0] for _, argv in README_COMMANDS]
    assert names.count("demo") >= 1 and names.count("study") >= 2


@pytest.mark.parametrize(
    ("line", "argv"), README_COMMANDS, ids=[f"README.md:{line}" for line, _ in README_COMMANDS]
)
def test_readme_riskfast_command_parses_and_validates(line: int, argv: list[str]) -> None:
    from riskfast.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as err:
        raise AssertionError(f"README.md:{line}: riskfast {' '.join(argv)} does not parse") from err
    if args.command == "study":
        from riskfast.demo.study import _resolve

        resolved = _resolve(args)
        assert resolved.seeds == args.seeds and set(resolved.grids) == set(args.arms)
    elif args.command == "demo" and getattr(args, "demo", None) is None:
        from riskfast.demo.train import _resolve

        assert _resolve(args).options
