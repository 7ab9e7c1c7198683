"""LoRA adapters on diffusers UNets through peft, saved in the diffusers format.

* :func:`add_lora` - adapters on the attention projections (``to_q``, ``to_k``,
  ``to_v``, ``to_out.0`` by default), the base weights frozen:
  ``unet.add_adapter(LoraConfig(...))`` where the model has it
  (``UNet2DConditionModel``), ``peft.inject_adapter_in_model`` otherwise
  (``UNet2DModel`` has no ``add_adapter`` in diffusers 0.42);
* :func:`save_lora_weights` - ``pytorch_lora_weights.safetensors`` with ``unet.``-prefixed
  keys in diffusers' naming and the ``LoraConfig`` as metadata, written by diffusers'
  own ``StableDiffusionPipeline.save_lora_weights``: a ``StableDiffusionPipeline`` (or
  any pipeline with ``load_lora_weights``) loads it with ``pipeline.load_lora_weights``;
* :func:`load_lora_weights` - loads such a file into a pipeline (its
  ``load_lora_weights``), a ``UNet2DConditionModel`` (its ``load_lora_adapter``) or a
  model without diffusers' loader (``UNet2DModel``, so ``DDPMPipeline``, which has no
  ``load_lora_weights``) through peft.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._checks import require_int, require_number

__all__ = [
    "ADAPTER_NAME",
    "LORA_TARGET_MODULES",
    "WEIGHT_NAME",
    "add_lora",
    "load_lora_weights",
    "lora_state_dict",
    "save_lora_weights",
    "set_lora_state_dict",
]

ADAPTER_NAME = "default"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections of diffusers' ``Attention`` (self- and cross-attention)."""
_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
)


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"LoRA needs peft ({err}); pip install 'riskfast[diffusion]' or pip install peft"
        ) from err
    return peft


def add_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    init: str = "gaussian",
) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and add LoRA adapters; returns the adapters' parameters.

    Args:
        unet: a diffusers UNet (or any module with the target projections).
        rank: r, the adapters' rank.
        alpha: LoRA's alpha (scale ``alpha / r``); ``None`` means ``rank`` (scale 1).
        target_modules: module names (suffixes) that get adapters.
        init: peft's ``init_lora_weights`` (``"gaussian"``: A ~ N(0, 1/r), B = 0, so the
            adapted model starts equal to the base one).
    """
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"unet: expected a torch.nn.Module, got {type(unet).__name__}")
    rank = require_int("rank", rank, low=1)
    alpha = float(rank) if alpha is None else require_number("alpha", alpha, low=0.0, low_open=True)
    if isinstance(target_modules, str) or not all(isinstance(m, str) for m in target_modules):
        raise TypeError("target_modules: expected a sequence of module names")
    targets = list(target_modules)
    names = [name for name, _ in unet.named_modules()]
    if not any(name == t or name.endswith("." + t) for name in names for t in targets):
        raise ValueError(
            f"target_modules: none of {targets} is a module of {type(unet).__name__} "
            "(give a model with attention, or finetune='full')"
        )
    if getattr(unet, "peft_config", None):
        raise ValueError("unet: already has adapters; give a model without them")
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=targets
    )
    unet.requires_grad_(False)
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        peft.inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
        # peft keeps the config on the model it injects into, as add_adapter does.
        unet.peft_config = {ADAPTER_NAME: config}
    params = [p for name, p in unet.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


def _lora_config(unet: torch.nn.Module) -> Any:
    configs = getattr(unet, "peft_config", None)
    if not configs or ADAPTER_NAME not in configs:
        raise ValueError(f"unet: has no LoRA adapter named {ADAPTER_NAME!r} (call add_lora)")
    return configs[ADAPTER_NAME]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's naming (``...to_q.lora_A.weight``), detached."""
    _lora_config(unet)
    state = _peft().get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach() for k, v in state.items()}


def set_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (peft's naming) into ``unet``'s adapters, exactly."""
    _lora_config(unet)
    result = _peft().set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"state: keys that match no adapter, e.g. {unexpected[:3]}")


def save_lora_weights(unet: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` in the diffusers format.

    Loadable with ``StableDiffusionPipeline.load_lora_weights(directory)`` (UNet
    adapters under the ``unet.`` prefix, the ``LoraConfig`` in the metadata) and with
    :func:`load_lora_weights` for models without diffusers' loader.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    config = _lora_config(unet)
    layers = convert_state_dict_to_diffusers(lora_state_dict(unet))
    layers = {k: v.contiguous() for k, v in layers.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {k: v for k, v in config.to_dict().items() if k in _CONFIG_KEYS}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    return directory / WEIGHT_NAME


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as handle:
        raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    metadata = json.loads(raw) if raw else {}
    return load_file(str(path)), metadata


def load_lora_weights(target: Any, directory: str | os.PathLike) -> None:
    """Load adapters saved by :func:`save_lora_weights` into ``target``.

    ``target``: a pipeline with ``load_lora_weights`` (``StableDiffusionPipeline``), a
    model with ``load_lora_adapter`` (``UNet2DConditionModel``), or any other module or
    pipeline whose ``unet`` lacks both (``UNet2DModel``, ``DDPMPipeline``): adapters are
    then added with the saved ``LoraConfig`` through peft (if missing) and filled.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise ValueError(f"directory: no {WEIGHT_NAME} in {directory}")
    if hasattr(target, "load_lora_weights"):
        target.load_lora_weights(str(path.parent), weight_name=path.name)
        return
    unet = target if isinstance(target, torch.nn.Module) else getattr(target, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"target: expected a pipeline or a UNet, got {type(target).__name__}")
    if hasattr(unet, "load_lora_adapter"):
        unet.load_lora_adapter(str(path.parent), weight_name=path.name, prefix="unet")
        return
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, metadata = _read(path)
    state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    if not state:
        raise ValueError(f"directory: {path} holds no 'unet.' adapter weights")
    state = convert_unet_state_dict_to_peft(state)
    if not getattr(unet, "peft_config", None):
        options = {k[len("unet.") :]: v for k, v in metadata.items() if k.startswith("unet.")}
        if "r" not in options:
            ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
            options = {"r": max(ranks), "lora_alpha": max(ranks)}
        options.setdefault("target_modules", list(LORA_TARGET_MODULES))
        add_lora(
            unet,
            rank=int(options["r"]),
            alpha=float(options.get("lora_alpha", options["r"])),
            target_modules=options["target_modules"],
        )
        unet.requires_grad_(False)
    set_lora_state_dict(unet, state)
