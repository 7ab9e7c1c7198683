"""The tiny UNet2DModel setting of ``test_bench_rlr.py`` (shared with its subprocesses)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DModel

from riskfast.rlr import RLRConfig, estimate_grad


def build(num_steps: int, options: dict):
    """``(unet, call)``: ``call(seed)`` runs one ``estimate_grad`` with ``RLRConfig(**options)``."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    scheduler.set_timesteps(num_steps)
    pattern = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(1, 1, 32, 32)

    def reward(x0):
        return -(x0 - pattern).square().mean(dim=(1, 2, 3))

    x_T = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    config = RLRConfig(**options)

    def call(seed=0):
        unet.zero_grad(set_to_none=True)
        return estimate_grad(
            unet,
            scheduler,
            reward,
            x_T,
            config=config,
            generator=torch.Generator().manual_seed(seed),
        )

    return unet, call
