"""A trained LoRA adapter in the diffusers / peft format, so ``pipe.load_lora_weights(directory)``
reads it: the adapter's weights under the pipeline component's prefix, with its peft config (rank,
alpha, targets) in the file's metadata. Without that metadata diffusers would take alpha = rank and
halve the published adapter's effect (r 32, alpha 64)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from rsm_core.records import current_umask

# the denoiser's class -> the diffusers pipeline that loads its LoRA, and the component it sits on
PIPELINES = {
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", "transformer"),
    "UNet2DConditionModel": ("StableDiffusionPipeline", "unet"),
}
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights looks for in a directory


def export_lora(model: nn.Module, adapter: str, directory: Path) -> Path:
    """Write ``adapter`` of ``model`` (its current values) to ``directory``, replacing it whole: the
    files are written into a temporary sibling that is renamed into place, so a crash never leaves
    half an export."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    kind = type(model).__name__
    if kind not in PIPELINES:
        raise TypeError(f"no diffusers LoRA format for a {kind}; known: {', '.join(PIPELINES)}")
    pipeline, component = PIPELINES[kind]
    weights = get_peft_model_state_dict(model, adapter_name=adapter)
    weights = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
    metadata = model.peft_config[adapter].to_dict()
    directory = Path(directory)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        getattr(diffusers, pipeline).save_lora_weights(
            staging,
            **{f"{component}_lora_layers": weights, f"{component}_lora_adapter_metadata": metadata},
            weight_name=WEIGHT_NAME,
        )
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory / WEIGHT_NAME
