"""``riskfast.rlr.window_memory`` against the process's real peak memory, by window length.

The setting of ``test_bench_rlr.py`` (a 0.70M-parameter ``UNet2DModel``, 8 starts of
1 x 32 x 32, T = 10, ``rest="lr"``, K = 1): for each h and with or without activation
checkpointing, one ``estimate_grad`` call's peak extra memory (``VmHWM`` in a fresh
process, as that benchmark measures it) beside ``window_memory(...).bytes_for(h)``.
What should agree is the growth with h (the rest of the call does not depend on h);
the offset is everything else the call allocates (gradient buffers, the stored chain,
temporaries). Usage: ``.venv/bin/python benchmarks/rlr_window_memory.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rlr_unet_setup import build
from test_bench_rlr import measure

from riskfast.rlr import RLRConfig, window_memory

WINDOWS = (1, 2, 4, 8)
STEPS = 10


def main() -> int:
    torch.set_num_threads(1)
    rows = [
        (
            "| checkpointing | h | window_memory (MiB) | peak extra, measured (MiB) | "
            "growth from h = 2: predicted / measured (MiB) |"
        ),
        "| --- | --- | --- | --- | --- |",
    ]
    for checkpoint in (True, False):
        options = {"rest": "lr", "checkpoint": checkpoint}
        unet, _ = build(STEPS, options)
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
        scheduler.set_timesteps(STEPS)
        x_T = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
        memory = window_memory(unet, scheduler, x_T, config=RLRConfig(**options))
        measured = {h: measure(STEPS, {**options, "window": h})["peak_extra"] for h in WINDOWS}
        for h in WINDOWS:
            growth = (
                ""
                if h < 2
                else (
                    f"{(memory.bytes_for(h) - memory.bytes_for(2)) / 2**20:.2f} / "
                    f"{(measured[h] - measured[2]) / 2**20:.2f}"
                )
            )
            rows.append(
                f"| {'on' if checkpoint else 'off'} | {h} | {memory.bytes_for(h) / 2**20:.2f} | "
                f"{measured[h] / 2**20:.1f} | {growth} |"
            )
            print(rows[-1], flush=True)
        print(memory, flush=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
