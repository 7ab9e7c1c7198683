"""The data, model and rewards of ``riskfast demo rlr``: digits that ship offline.

* :func:`load_digit_images` - the 1,797 handwritten digits of scikit-learn
  (``sklearn.datasets.load_digits``, 8 x 8, values 0..16) as ``[N, 1, 8, 8]`` in
  ``[-1, 1]``, with their labels;
* :func:`build_unet` - a tiny class-conditional diffusers ``UNet2DModel`` (class
  embeddings for the ten digits and a "no class" label 10; attention in its lower block,
  where the LoRA adapters go);
* :func:`pretrain_unet` - epsilon-prediction training on the digits (DDPM noise
  schedule, labels dropped to "no class" 10% of the time, so the model also samples
  unconditionally);
* :func:`train_classifier` - a small CNN on the same digits (slightly noised inputs),
  whose log-probability of a target digit is the differentiable reward and whose hit
  (argmax equals the target) the non-differentiable one;
* :func:`pretrained` - both, cached on disk under a key of their settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

NULL_CLASS = 10
"""The UNet's "no class" label (classifier-free training), for unconditional sampling."""


@dataclass(frozen=True)
class DigitSetup:
    """Settings of the pretrained UNet and classifier (the cache key)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    unet_steps: int = 1500
    unet_batch: int = 128
    unet_lr: float = 2e-3
    label_dropout: float = 0.1
    classifier_steps: int = 600
    classifier_batch: int = 128
    classifier_lr: float = 3e-3
    seed: int = 0
    version: int = 1

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] int64)``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def build_unet(block_out_channels: tuple[int, ...] = (32, 64)) -> Any:
    """The digit UNet: 1 x 8 x 8, class embeddings for 0..9 and ``NULL_CLASS``."""
    from diffusers import UNet2DModel

    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (len(block_out_channels) - 1)
    up = tuple(block.replace("Down", "Up") for block in reversed(down))
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=8,
        num_class_embeds=NULL_CLASS + 1,
        attention_head_dim=8,
    )


class DigitClassifier(torch.nn.Module):
    """``[N, 1, 8, 8]`` in ``[-1, 1]`` -> ``[N, 10]`` logits (two convolutions, a linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1, stride=2),
            torch.nn.SiLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 4 * 4, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def pretrain_unet(setup: DigitSetup, progress: Any = None) -> dict[str, Any]:
    """Train :func:`build_unet` on the digits; returns ``{"state", "loss", "seconds"}``."""
    from diffusers import DDPMScheduler

    images, labels = load_digit_images()
    torch.manual_seed(setup.seed)
    unet = build_unet(setup.block_out_channels)
    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    generator = torch.Generator().manual_seed(setup.seed)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=setup.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=setup.unet_lr, total_steps=setup.unet_steps, pct_start=0.1
    )
    started = time.perf_counter()
    losses = []
    for _ in range(setup.unet_steps):
        rows = torch.randint(0, len(images), (setup.unet_batch,), generator=generator)
        x0, y = images[rows], labels[rows].clone()
        y[torch.rand(len(rows), generator=generator) < setup.label_dropout] = NULL_CLASS
        t = torch.randint(0, 1000, (len(rows),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (unet(x_t, t, class_labels=y).sample - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    tail = losses[-100:]
    return {
        "state": {k: v.detach().clone() for k, v in unet.state_dict().items()},
        "loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - started,
    }


def train_classifier(setup: DigitSetup) -> dict[str, Any]:
    """Train :class:`DigitClassifier` on 1,500 digits, test on the other 297."""
    images, labels = load_digit_images()
    torch.manual_seed(setup.seed)
    model = DigitClassifier()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(setup.seed + 1))
    train, test = order[:1500], order[1500:]
    generator = torch.Generator().manual_seed(setup.seed + 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=setup.classifier_lr)
    for _ in range(setup.classifier_steps):
        rows = train[torch.randint(0, len(train), (setup.classifier_batch,), generator=generator)]
        noisy = images[rows] + 0.1 * torch.randn(images[rows].shape, generator=generator)
        loss = torch.nn.functional.cross_entropy(model(noisy), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(images[test]).argmax(1) == labels[test]).double().mean())
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "test_accuracy": accuracy,
    }


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "riskfast" / "rlr_digits"


def pretrained(
    setup: DigitSetup, cache_dir: str | os.PathLike | None = None, progress: Any = None
) -> dict[str, Any]:
    """The pretrained UNet and classifier states for ``setup``, from the cache if there.

    Returns ``{"unet", "classifier", "unet_loss", "classifier_accuracy", "seconds",
    "cached", "path"}``; a new pair is saved to ``cache_dir/<key>.pt`` (default
    ``~/.cache/riskfast/rlr_digits``).
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"digits-{setup.key()}.pt"
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True)
            if saved.get("setup") == json.dumps(asdict(setup), sort_keys=True):
                return {**saved, "cached": True, "path": str(path)}
        except (OSError, RuntimeError, EOFError) as err:
            print(f"cache {path} unreadable ({err}); training again", file=sys.stderr)
    started = time.perf_counter()
    unet = pretrain_unet(setup, progress)
    classifier = train_classifier(setup)
    saved = {
        "setup": json.dumps(asdict(setup), sort_keys=True),
        "unet": unet["state"],
        "classifier": classifier["state"],
        "unet_loss": unet["loss"],
        "classifier_accuracy": classifier["test_accuracy"],
        "seconds": time.perf_counter() - started,
    }
    directory.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(saved, partial)
    os.replace(partial, path)
    return {**saved, "cached": False, "path": str(path)}


def target_log_prob(
    classifier: DigitClassifier, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``log p(target | image)`` under the classifier, ``[N]`` (differentiable)."""
    logits = classifier(images.float())
    return logits.log_softmax(dim=1).gather(1, targets.view(-1, 1).to(logits.device)).squeeze(1)


def target_hit(
    classifier: DigitClassifier, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """1 where the classifier's top class is the target, else 0, ``[N]`` (no gradient)."""
    with torch.no_grad():
        top = classifier(images.float()).argmax(dim=1)
    return (top == targets.to(top.device)).to(images.dtype)


def pairwise_diversity(images: torch.Tensor) -> float:
    """Mean L2 distance between two different samples (pixels in [-1, 1]; 8 x 8 = 64 of them)."""
    flat = images.reshape(images.shape[0], -1).double()
    n = flat.shape[0]
    if n < 2:
        return 0.0
    distances = torch.cdist(flat, flat)
    return float(distances.sum() / (n * (n - 1)))


def nearest_data_distance(images: torch.Tensor, data: torch.Tensor) -> float:
    """Mean L2 distance from each sample to its nearest real digit (any class).

    How far the samples sit from the data: a sample that pleases the classifier without
    looking like a handwritten digit (a faint or blotchy image) is far from all of them.
    """
    flat = images.reshape(images.shape[0], -1).double().cpu()
    reference = data.reshape(data.shape[0], -1).double()
    return float(torch.cdist(flat, reference).min(dim=1).values.mean())
