"""The spec's test setting for RLR (``spec/rlr.md``, "Testing the estimator").

A 2-D epsilon-predicting MLP with a sinusoidal time embedding (about 1.5k parameters),
pretrained in float64 for 1,000 Adam steps on a mixture of four Gaussians, a diffusers
``DDIMScheduler`` with T = 10, eta = 1 and "trailing" spacing, and the reward
``-||x_0 - c||^2``. Shared by the tests and the benchmarks; the pretrained weights
are computed once per process (about 2 s) and copied for each user.

Also the tiny diffusers UNets the sampler and trainer tests build from configs
(:func:`tiny_unet2d`, :func:`tiny_unet2d_condition`; nothing downloaded).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

TARGET = (1.0, 0.5)


class ToyDenoiser(torch.nn.Module):
    """``eps_theta(x, t)`` for 2-D points: an MLP on ``[x, sin(t f), cos(t f)]``."""

    def __init__(self, hidden: int = 32, frequencies: int = 8) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, 4.0, frequencies)))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 * frequencies, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angle = (t.to(x.dtype) / 1000.0)[:, None] * self.frequencies.to(x.dtype)[None, :]
        return self.net(torch.cat([x, torch.sin(angle), torch.cos(angle)], dim=1))


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    centers = torch.tensor(
        [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64
    )
    which = torch.randint(0, 4, (n,), generator=generator)
    return centers[which] + 0.15 * torch.randn(n, 2, generator=generator, dtype=torch.float64)


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread (restored after).

    The toy's tensors are tiny, so threads only add overhead; and on a shared 2-core
    machine two spinning intra-op threads per process oversubscribe the cores (measured:
    206 ms per ZO call with 2 threads under load, 8 ms with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _pretrained_state() -> dict[str, torch.Tensor]:
    with one_thread():
        return _pretrain()


def _pretrain() -> dict[str, torch.Tensor]:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    model = ToyDenoiser().double()
    alphas = DDPMScheduler().alphas_cumprod.double()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(1000):
        x0 = mixture(256, gen)
        t = torch.randint(0, 1000, (256,), generator=gen)
        eps = torch.randn(256, 2, generator=gen, dtype=torch.float64)
        a = alphas[t][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = (model(x_t, t) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained_denoiser() -> ToyDenoiser:
    """A fresh float64 copy of the pretrained toy denoiser."""
    model = ToyDenoiser().double()
    model.load_state_dict(copy.deepcopy(_pretrained_state()))
    return model


def scheduler(num_steps: int = 10, spacing: str = "trailing", **config):
    from diffusers import DDIMScheduler

    config.setdefault("set_alpha_to_one", False)
    config.setdefault("clip_sample", False)
    sched = DDIMScheduler(timestep_spacing=spacing, **config)
    sched.set_timesteps(num_steps)
    return sched


def reward(x0: torch.Tensor) -> torch.Tensor:
    target = torch.tensor(TARGET, dtype=x0.dtype, device=x0.device)
    return -(x0 - target).square().sum(dim=1)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
            if p.requires_grad
        ]
    )


def tiny_unet2d(num_class_embeds: int | None = 4, attention: bool = True):
    """A 1 x 8 x 8 class-conditional ``UNet2DModel`` (16, 32 channels), built from a config.

    ``attention``: self-attention in its lower block (where LoRA adapters go); without
    it, plain ``DownBlock2D`` / ``UpBlock2D``. The weights come from torch's global RNG
    (seed it first).
    """
    from diffusers import UNet2DModel

    lower = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", lower[0]),
        up_block_types=(lower[1], "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
        attention_head_dim=8,
    )


def tiny_unet2d_condition(cross_attention_dim: int = 16, attention_head_dim: int = 8):
    """A 4 x 8 x 8 text-conditional ``UNet2DConditionModel`` (16, 32 channels, cross-attention
    to ``[B, L, cross_attention_dim]`` embeddings), built from a config (seed first)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
    )
