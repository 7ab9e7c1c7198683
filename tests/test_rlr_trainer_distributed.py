"""RLRTrainer on 2 CPU processes (accelerate over torch.distributed, gloo; launched by torchrun).

The test launches this file as a script on two ranks. Each rank trains LoRA adapters of
a tiny float64 class-conditional ``UNet2DModel`` for two RLR steps (``rest="zo"``:
antithetic ZO, window, first-order term) with 2 starts per rank, and records after each
step's all-reduce the averaged gradient, the step's metrics and, at the end, the
adapters. The reference is one process (this test's) with 4 starts per step: the union
of the ranks' batches. The test checks that both ranks really ran on their own chains
(their rewards differ), and that the averaged gradient, the union's metrics (reward
mean, ZO coefficient, evaluations) and the weights after two optimizer steps equal the
one-process run's to a few ulps of float64.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

WORLD = 2
PER_RANK = 2
STEPS = 2


def _setting(world: int, batch_size: int) -> Any:
    """``(trainer)`` built the same way on every rank and in the one-process reference."""
    import rlr_toy
    from diffusers import DDIMScheduler

    from riskfast.rlr import RLRConfig, RLRTrainer, TrainerConfig

    torch.set_default_dtype(torch.float64)  # float64 throughout, LoRA adapters included
    torch.manual_seed(0)
    unet = rlr_toy.tiny_unet2d(num_class_embeds=4)
    scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)

    def reward(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -(images.mean(dim=(1, 2, 3)) - labels.to(images.dtype) / 4).square()

    config = TrainerConfig(
        rlr=RLRConfig(rest="zo", window=2, sigma_p=1e-2),
        max_steps=STEPS,
        batch_size=batch_size,
        num_inference_steps=6,
        learning_rate=1e-2,
        max_grad_norm=None,
        progress=False,
        report_to="none",
        cpu=True,
    )
    return RLRTrainer(unet, reward, config, scheduler=scheduler, class_labels=[0, 1, 2, 3])


def _train_and_record(trainer: Any) -> dict[str, Any]:
    records = []
    for _ in range(STEPS):
        metrics = trainer.accumulate_gradient()
        grads = torch.cat([p.grad.detach().reshape(-1) for p in trainer.trainable_parameters])
        records.append({"grads": grads.clone(), "metrics": metrics})
        trainer.apply_gradients()
        trainer.step += 1
    return {
        "records": records,
        "weights": torch.cat([p.detach().reshape(-1) for p in trainer.trainable_parameters]),
    }


def _worker(out_dir: str) -> None:
    """Runs on every rank under torchrun."""
    torch.set_num_threads(1)
    trainer = _setting(WORLD, PER_RANK)
    state = trainer.accelerator.state
    seen: list[torch.Tensor] = []
    reward = trainer.reward_fn

    def spy(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(images.detach().mean(dim=(1, 2, 3)).clone())
        return reward(images, labels)

    trainer.reward_fn = spy
    result = _train_and_record(trainer)
    result["image_means"] = torch.cat(seen)
    result.update(
        rank=trainer.rank,
        world=trainer.world_size,
        backend=str(torch.distributed.get_backend())
        if torch.distributed.is_initialized()
        else None,
        distributed_type=str(state.distributed_type),
    )
    torch.save(result, os.path.join(out_dir, f"rank{trainer.rank}.pt"))
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
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "python"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(Path(__file__).resolve()),
        "--worker",
        str(out_dir),
    ]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    pytest.importorskip("peft", reason="LoRA needs peft: pip install 'riskfast[diffusion]'")
    pytest.importorskip("accelerate", reason="the trainer runs on accelerate")
    out_dir = tmp_path_factory.mktemp("rlr_ddp")
    result = _launch(out_dir)
    if result.returncode != 0:
        pytest.fail(
            f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-8000:]}"
        )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    try:
        return _train_and_record(_setting(1, WORLD * PER_RANK))
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)


def test_two_processes_really_ran(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == WORLD for r in ranks)
    assert all(r["backend"] == "gloo" for r in ranks)
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    # Each rank sampled its own chains (its rows of the union's starts and noises).
    assert ranks[0]["image_means"].shape == ranks[1]["image_means"].shape
    assert not torch.allclose(ranks[0]["image_means"], ranks[1]["image_means"])


def test_averaged_gradient_equals_one_process_on_the_union(
    ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    for step in range(STEPS):
        reference = one_process["records"][step]
        for rank in ranks:
            record = rank["records"][step]
            assert reference["grads"].abs().max() > 0
            torch.testing.assert_close(
                record["grads"],
                reference["grads"],
                rtol=1e-10,
                atol=1e-12 * float(reference["grads"].abs().max()),
            )
            got, want = record["metrics"], reference["metrics"]
            assert got["model_evaluations"] == want["model_evaluations"]
            assert got["window_start"] == want["window_start"]
            for key in ("reward_mean", "reward_std", "zo_coefficient"):
                assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-14), key
        # The ranks' gradients agree with each other exactly (one all-reduce).
        assert torch.equal(ranks[0]["records"][step]["grads"], ranks[1]["records"][step]["grads"])


def test_weights_after_two_steps_equal_one_process(
    ranks: list[dict[str, Any]], one_process: dict[str, Any]
) -> None:
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    torch.testing.assert_close(ranks[0]["weights"], one_process["weights"], rtol=1e-10, atol=1e-13)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
