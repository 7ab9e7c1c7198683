"""RiskPOTrainer on 2 CPU processes (torch.distributed, gloo, launched by torchrun).

The test launches this file as a script on two ranks. Each rank trains a tiny Qwen2 for
a few RiskPO steps and records, per generation batch, the gathered rewards, bundles,
quantiles and advantages, its own slice, and its (synchronised) gradients. The test then
checks that both ranks computed the same bundles, quantiles (tracker included) and
advantages as one process fed the same rollouts, that each rank kept its own slice,
that the ranks trained on different completions, and that their gradients and final
weights agree (DDP synchronised them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

GROUP = 4
PER_RANK_PROMPTS = 2
STEPS = 3
WORLD = 2


def _reward(completions: list[str], **_: Any) -> list[float]:
    return [float(sum(map(ord, c)) % 3 == 0) for c in completions]


def _worker(out_dir: str) -> None:
    """Runs on every rank under torchrun."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import TrainerCallback

    from riskfast.demo.task import build_model, build_tokenizer, sample_questions
    from riskfast.integrations.trl import RiskPOConfig, RiskPOTrainer

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, "tiny", seed=0)
    questions = sample_questions(64, "train", seed=0)
    dataset = Dataset.from_list([{"prompt": q.prompt, "answer": q.answer} for q in questions])
    args = RiskPOConfig(
        output_dir=os.path.join(out_dir, "trainer"),
        max_steps=STEPS,
        per_device_train_batch_size=GROUP * PER_RANK_PROMPTS,
        num_generations=GROUP,
        max_completion_length=6,
        learning_rate=5e-3,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        bundle_size=2,
        quantile_mode="tracker",
        ddp_backend="gloo",
    )
    records: list[dict[str, Any]] = []
    trainer: RiskPOTrainer | None = None

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            assert trainer is not None
            last = trainer.riskpo_last
            grads = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                for p in trainer.model.parameters()
            ])
            records.append({
                "rewards": last["rewards"].clone(),
                "question_ids": last["question_ids"].clone(),
                "bundle_ids": last["result"].bundle_ids.clone(),
                "member_ids": last["result"].member_ids.clone(),
                "quantiles": last["result"].quantiles.clone(),
                "advantages": last["result"].advantages.clone(),
                "own": last["advantages"].clone(),
                "tracker": trainer.riskpo_tracker.values.clone(),
                "grads": grads.clone(),
            })

    trainer = RiskPOTrainer(
        model=model,
        reward_funcs=[_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Recorder()],
    )
    completions: list[torch.Tensor] = []
    original = trainer._generate_and_score_completions

    def spy(inputs: Any) -> dict[str, Any]:
        output = original(inputs)
        completions.append(output["completion_ids"].detach().cpu().clone())
        return output

    trainer._generate_and_score_completions = spy  # type: ignore[method-assign]
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "rank": rank,
            "world": trainer.accelerator.num_processes,
            "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
            "records": records,
            "completions": completions,
            "params": torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    # Leave the process group before exiting: a rank that exits with gloo's threads
    # still running can abort in teardown ("terminate called without an active
    # exception", seen once on the 2-core machine after training had finished).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # and skip the interpreter's teardown: the abort recurred once with the group left
    # (2026-11-30, rank 1, after its results were saved). Everything is on disk by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(out_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "python"), os.environ.get("PYTHONPATH", "")]
        ),
        "ACCELERATE_USE_CPU": "true",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", str(Path(__file__).resolve()), "--worker", str(out_dir),
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'riskfast[trl]'")
    out_dir = tmp_path_factory.mktemp("ddp")
    result = _launch(out_dir)
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    loaded = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    return loaded


def test_two_processes_really_ran(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == WORLD for r in ranks)
    assert all(r["backend"] == "gloo" for r in ranks)
    assert all(len(r["records"]) == STEPS for r in ranks)
    # Different completions on the two ranks: each trained on its own share.
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["completions"], ranks[1]["completions"]))


def test_same_bundles_quantiles_advantages_as_one_process(ranks: list[dict[str, Any]]) -> None:
    from riskfast.integrations.trl import GatheredQuantileTracker
    from riskfast.riskpo import advantages

    generator = torch.Generator().manual_seed(0)  # bundle_seed defaults to seed = 0
    tracker = GatheredQuantileTracker(0.2, 0.8, 0.1)
    local = GROUP * PER_RANK_PROMPTS
    signal = 0.0
    for step in range(STEPS):
        rec0, rec1 = ranks[0]["records"][step], ranks[1]["records"][step]
        assert rec0["rewards"].numel() == WORLD * local
        for key in ("rewards", "question_ids", "bundle_ids", "member_ids", "quantiles",
                    "advantages", "tracker"):
            assert torch.equal(rec0[key], rec1[key]), (step, key)
        single = advantages(
            rec0["rewards"], rec0["question_ids"], bundle_size=2, quantile="tracker",
            tracker=tracker, generator=generator,
        )
        assert torch.equal(single.bundle_ids, rec0["bundle_ids"])
        assert torch.equal(single.member_ids, rec0["member_ids"])
        assert torch.equal(single.quantiles, rec0["quantiles"])
        assert torch.equal(single.advantages, rec0["advantages"])
        assert torch.equal(tracker.values, rec0["tracker"])
        for rank, rec in enumerate((rec0, rec1)):
            assert torch.equal(rec["own"], single.advantages[rank * local : (rank + 1) * local])
        signal += float(single.advantages.abs().sum())
    assert signal > 0, "no reward signal in any step; the comparison would be vacuous"


def test_gradients_synchronised(ranks: list[dict[str, Any]]) -> None:
    nonzero = 0
    for rec0, rec1 in zip(ranks[0]["records"], ranks[1]["records"]):
        torch.testing.assert_close(rec0["grads"], rec1["grads"], rtol=1e-5, atol=1e-8)
        nonzero += int(rec0["grads"].abs().sum() > 0)
    assert nonzero > 0
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=1e-5, atol=1e-7)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
