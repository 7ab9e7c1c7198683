"""The demo's verifiable task: reversed-digit addition of graded length.

A question is ``a + b`` with operands of 1 to ``max_digits`` digits. Numbers are written
least-significant digit first (operands and answer reversed), which a tiny causal LM
learns far faster than the usual order: ``123 + 45 = 168`` is the prompt ``"321+54="``
with the answer ``"861"`` followed by the end-of-sequence token. The reward is exact
match (1.0 or 0.0) of the completion with the answer.

Everything is built in code, nothing is downloaded: a character-level tokenizer
(:func:`build_tokenizer`) and a small Qwen2 model from a config (:func:`build_model`).

Difficulty levels: level ``d`` (1..max_digits) has a first operand of exactly ``d``
digits and a second of 1..d digits. Questions are split by a hash of ``(a, b)`` into
a held-out test pool (1 in 4), a validation pool (1 in 4, used only to stop the warm
start) and a training pool (the rest), so no test question is ever trained on.

Evaluation (:func:`evaluate`) samples ``n`` completions per question at temperature 1
and reports pass@k with the unbiased estimator ``1 - C(n - c, k) / C(n, k)``
(spec ``riskpo.md`` section 6) and the mean per-token entropy of the policy over the
sampled response tokens.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
CHARS = "0123456789+="
"""Every character a prompt or answer can contain."""

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "mini": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256},
    "small": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 512,
    },
    "medium": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "intermediate_size": 1024,
    },
}
"""Model sizes for :func:`build_model`: ``tiny`` (tests and ``--quick``, 21k parameters),
``mini`` (``riskfast study``, 133k), ``small`` (the demo default, 1.05M) and ``medium``
(4.2M)."""


@dataclass(frozen=True)
class Question:
    """One addition question.

    Attributes:
        a, b: the operands.
        level: difficulty, the digit count of ``a`` (``b`` has at most as many).
        prompt: ``rev(a) + "+" + rev(b) + "="``.
        answer: ``rev(a + b)``; the completion must be exactly this, then end.
    """

    a: int
    b: int
    level: int

    @property
    def prompt(self) -> str:
        return f"{str(self.a)[::-1]}+{str(self.b)[::-1]}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)[::-1]


def split_of(a: int, b: int) -> str:
    """``"test"``, ``"val"`` or ``"train"``: a fixed hash rule, the same on every machine."""
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=2).digest()
    bucket = digest[0] % 4
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _random_number(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randrange(0, 10)
    return rng.randrange(10 ** (digits - 1), 10**digits)


def sample_questions(
    count: int, split: str, *, max_digits: int = 4, seed: int = 0, unique: bool = False
) -> list[Question]:
    """Draw ``count`` questions of ``split`` with levels spread evenly over 1..max_digits.

    Args:
        count: how many questions.
        split: ``"train"``, ``"val"`` or ``"test"`` (see :func:`split_of`).
        max_digits: the hardest level.
        seed: the draw is a function of the seed alone.
        unique: no repeated question (a level with too few questions of this split
            then contributes all it has).

    Returns:
        Questions, level ``1, 2, ..., max_digits, 1, 2, ...`` in turn.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split: must be 'train', 'val' or 'test', got {split!r}")
    if max_digits < 1 or max_digits > 9:
        raise ValueError(f"max_digits: must be in 1..9, got {max_digits}")
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    rng = random.Random(f"{seed}-{split}-{max_digits}")
    seen: set[tuple[int, int]] = set()
    exhausted: set[int] = set()
    out: list[Question] = []
    level = 0
    while len(out) < count and len(exhausted) < max_digits:
        level = level % max_digits + 1
        if level in exhausted:
            continue
        for _ in range(2000):
            a = _random_number(rng, level)
            b = _random_number(rng, rng.randint(1, level))
            if split_of(a, b) != split or (unique and (a, b) in seen):
                continue
            seen.add((a, b))
            out.append(Question(a, b, level))
            break
        else:
            exhausted.add(level)
    return out


def rl_questions(
    count: int, *, max_digits: int = 4, seed: int = 0, train_questions: int | None = None
) -> list[Question]:
    """The RL prompt stream: ``count`` training-pool questions, in the order they are used.

    Args:
        count: prompts to draw (``steps x prompts_per_step``).
        max_digits: the hardest level.
        seed: the draw is a function of the seed alone.
        train_questions: ``None`` (default): every prompt is a fresh draw from the training
            pool (:func:`sample_questions`; with 1-3 digits or more almost every question
            is new, about one epoch). An integer ``N``: a fixed training set of ``N``
            distinct questions (levels in turn, as :func:`sample_questions` with
            ``unique=True``), passed over in epochs, each epoch in a new random order,
            the last one cut at ``count``; the paper's runs work this way (the official
            MATH script: 200 steps x 1,024 prompts over about 15k questions, some 14
            epochs).

    Returns:
        ``count`` questions.
    """
    if count < 0:
        raise ValueError(f"count: must be >= 0, got {count}")
    if train_questions is None:
        return sample_questions(count, "train", max_digits=max_digits, seed=seed)
    if isinstance(train_questions, bool) or not isinstance(train_questions, int):
        raise TypeError(f"train_questions: must be an int or None, got {train_questions!r}")
    if train_questions < 1:
        raise ValueError(f"train_questions: must be >= 1, got {train_questions}")
    pool = sample_questions(train_questions, "train", max_digits=max_digits, seed=seed, unique=True)
    if len(pool) < train_questions:
        raise ValueError(
            f"train_questions: the training pool of levels 1..{max_digits} yields only "
            f"{len(pool)} distinct questions, got {train_questions}"
        )
    order = random.Random(f"epochs-{seed}-{max_digits}")
    out: list[Question] = []
    while len(out) < count:
        epoch = list(pool)
        order.shuffle(epoch)
        out.extend(epoch)
    return out[:count]


def is_correct(completion: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace (the EOS is decoded away)."""
    return completion.strip() == answer


def exact_match_reward(completions: Sequence[str], answer: Sequence[str], **_: Any) -> list[float]:
    """TRL reward function: 1.0 where the completion is exactly the answer, else 0.0.

    Used as ``reward_funcs=[exact_match_reward]``; TRL passes the dataset's ``answer``
    column as a keyword argument.
    """
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` over :data:`CHARS` (left padding).

    Ids: ``<pad>`` = 0, ``<eos>`` = 1, then one per character. No BOS is added, and
    the decoder fuses characters back into a string.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, padding_side="left"
    )
    return tokenizer


def build_model(tokenizer: Any, size: str = "small", *, seed: int = 0) -> Any:
    """A freshly initialised ``Qwen2ForCausalLM`` of one of :data:`MODEL_SIZES`.

    RoPE positions make left-padded prompts (as TRL feeds them, without position ids)
    behave like unpadded ones. float32, eager attention, no weight download.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"size: must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    dims = MODEL_SIZES[size]
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
        **dims,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def supervised_batch(
    tokenizer: Any, questions: Sequence[Question], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + answer + <eos>`` with labels on the answer and EOS only."""
    prompts = _encode(tokenizer, [q.prompt for q in questions])
    answers = _encode(tokenizer, [q.answer for q in questions])
    eos = tokenizer.eos_token_id
    rows = [p + a + [eos] for p, a in zip(prompts, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(p) : len(row)] = torch.tensor(row[len(p) :])
        attention[i, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k)/C(n, k)``."""
    if not 0 <= c <= n:
        raise ValueError(f"c: must be in 0..n ({n}), got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in 1..n ({n}), got {k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`.

    Attributes:
        pass_at: ``{k: mean pass@k over questions}``.
        pass_at_by_level: ``{level: {k: pass@k}}``.
        entropy: mean per-token policy entropy (nats) over sampled response tokens.
        num_questions, num_samples: the sizes used.
    """

    pass_at: dict[int, float]
    pass_at_by_level: dict[int, dict[int, float]]
    entropy: float
    num_questions: int
    num_samples: int


@torch.no_grad()
def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 1024,
) -> tuple[list[str], float]:
    """Sample one completion per prompt at temperature 1 (no top-k / top-p).

    Returns the decoded completions and the mean per-token entropy of the policy over
    the sampled response tokens (up to and including the first EOS).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    entropy_sum = 0.0
    token_count = 0
    eos = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        width = enc["input_ids"].shape[1]
        completion = out.sequences[:, width:]
        # Mask: tokens up to and including the first EOS.
        is_eos = completion == eos
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        mask = ~after_eos
        scores = torch.stack(out.scores, dim=1).float()  # [b, C, V], temperature 1, no filtering
        logp = torch.log_softmax(scores, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        entropy_sum += float(entropy[mask].sum())
        token_count += int(mask.sum())
        texts.extend(tokenizer.batch_decode(completion, skip_special_tokens=True))
    if was_training:
        model.train()
    return texts, entropy_sum / max(token_count, 1)


def evaluate(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    num_samples: int = 16,
    ks: Iterable[int] = (1, 2, 4, 8, 16),
    seed: int = 0,
    max_new_tokens: int = 8,
    batch_size: int = 1024,
) -> Evaluation:
    """Held-out pass@k (unbiased estimator) and policy entropy from sampled completions.

    Sampling runs under a forked RNG seeded with ``seed``, so evaluating never changes
    the caller's random stream (a training run with evaluations draws the same rollouts
    as one without) and two models are compared on the same random numbers.
    """
    ks = sorted({int(k) for k in ks})
    if not questions:
        raise ValueError("questions: need at least one question")
    if ks[0] < 1 or ks[-1] > num_samples:
        raise ValueError(f"ks: must lie in 1..num_samples ({num_samples}), got {ks}")
    prompts = [q.prompt for q in questions for _ in range(num_samples)]
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        texts, entropy = sample_completions(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
    per_level: dict[int, list[dict[int, float]]] = {}
    overall: list[dict[int, float]] = []
    for i, q in enumerate(questions):
        got = texts[i * num_samples : (i + 1) * num_samples]
        c = sum(is_correct(t, q.answer) for t in got)
        row = {k: pass_at_k(num_samples, c, k) for k in ks}
        overall.append(row)
        per_level.setdefault(q.level, []).append(row)

    def mean_rows(rows: list[dict[int, float]]) -> dict[int, float]:
        return {k: sum(r[k] for r in rows) / len(rows) for k in ks}

    return Evaluation(
        pass_at=mean_rows(overall),
        pass_at_by_level={lvl: mean_rows(rows) for lvl, rows in sorted(per_level.items())},
        entropy=entropy,
        num_questions=len(questions),
        num_samples=num_samples,
    )


def warm_start(
    model: Any,
    tokenizer: Any,
    *,
    steps: int = 600,
    batch_size: int = 256,
    lr: float = 2e-3,
    max_digits: int = 4,
    seed: int = 0,
    target: float | None = 0.55,
    val_questions: Sequence[Question] | None = None,
    check_every: int = 50,
    min_steps: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Supervised warm start on training-pool questions (cross-entropy on answer + EOS).

    Stops after ``steps`` optimiser steps, or earlier (after ``min_steps``) once the
    sampled accuracy (pass@1 from 4 samples) on ``val_questions`` reaches ``target``;
    the validation pool is disjoint from the test pool. AdamW with a short linear
    warm-up. Returns a small log: steps taken, final loss, validation accuracy.
    """
    device = next(model.parameters()).device
    generator = random.Random(f"warm-{seed}")
    pool = sample_questions(20000, "train", max_digits=max_digits, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    loss_value = float("nan")
    val_acc: float | None = None
    history: list[dict[str, float]] = []
    step = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for step in range(1, steps + 1):
            batch = supervised_batch(tokenizer, generator.sample(pool, batch_size), device)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            if progress is not None:
                progress.update(1)
                progress.set_postfix(phase="warm start", loss=f"{loss_value:.3f}")
            if val_questions and target is not None and step % check_every == 0:
                val_acc = evaluate(
                    model, tokenizer, val_questions, num_samples=4, ks=(1,), seed=seed
                ).pass_at[1]
                history.append({"step": step, "loss": loss_value, "val_pass@1": val_acc})
                model.train()
                if step >= min_steps and val_acc >= target:
                    break
    if progress is not None and step < steps:
        progress.update(steps - step)
    model.eval()
    return {"steps": step, "loss": loss_value, "val_pass@1": val_acc, "history": history}
