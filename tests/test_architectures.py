"""The published LoRA, counted on the real SD3.5-M and SD1.5 classes built on the meta device.

The expected numbers are worked out by hand from the architectures, not read back from the code: an
SD3.5-M joint-attention projection is 1536 -> 1536, so a rank-r LoRA on it has r (1536 + 1536)
weights; its 24 blocks have 8 joint-attention projections each, except the last (context_pre_only),
which has no ``to_add_out``: 191 layers. Blocks 0-12 add the MMDiT-X ``attn2`` (4 projections).
"""

from __future__ import annotations

import pytest

from rsm_core.backbones.architectures import (
    PUBLISHED_LORA,
    SD35_JOINT_ATTENTION,
    count_lora,
    sd15_unet,
    sd35_medium_transformer,
)
from rsm_core.backbones.base import ATTENTION_PROJECTIONS
from rsm_core.backbones.stable_diffusion import SD35

WIDTH = 1536


def sd15_lora_parameters(rank: int) -> int:
    """SD1.5 has 16 transformer blocks (width C: 5 at 320, 5 at 640, 6 at 1280). Self-attention: four
    C -> C projections; cross-attention: q and out C -> C, k and v 768 -> C. Total r (14 C + 1536)."""
    per_rank = sum(blocks * (14 * width + 2 * 768) for blocks, width in ((5, 320), (5, 640), (6, 1280)))
    return rank * per_rank


@pytest.mark.parametrize(
    ("key", "rank", "alpha"),
    [
        (("sd35", "zeroth-order"), 32, 64.0),  # TempFlow-GRPO: r 32, alpha 64 (scale 2)
        (("sd35", "first-order"), 8, 8.0),  # VGG-Flow
        (("sd15", "zeroth-order"), 16, 16.0),  # PCPO
        (("sd15", "first-order"), 8, 8.0),  # SQDF, Residual nabla-DB
    ],
)
def test_published_lora_ranks(key: tuple[str, str], rank: int, alpha: float) -> None:
    assert (PUBLISHED_LORA[key].rank, PUBLISHED_LORA[key].alpha) == (rank, alpha)


def test_sd35_targets_the_joint_attention_projections() -> None:
    assert SD35.lora_targets == SD35_JOINT_ATTENTION
    assert {t.split(".", 1)[1] for t in SD35_JOINT_ATTENTION} == {
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }


def test_the_meta_models_are_sd35_medium_and_sd15() -> None:
    transformer = sd35_medium_transformer()
    assert next(transformer.parameters()).device.type == "meta"
    assert sum(p.numel() for p in transformer.parameters()) == 2_243_171_520  # 2.24 B
    assert sum(p.numel() for p in sd15_unet().parameters()) == 859_520_964  # SD1.5's UNet


def test_sd35_zeroth_order_lora_wraps_the_joint_attention_of_every_block() -> None:
    spec = PUBLISHED_LORA[("sd35", "zeroth-order")]
    count = count_lora(sd35_medium_transformer(), spec.targets, spec.rank, spec.alpha)
    assert count.modules == 24 * 8 - 1 == 191
    assert count.parameters == 191 * 32 * 2 * WIDTH == 18_776_064


def test_bare_projection_names_would_wrap_attn2_and_miss_the_text_stream() -> None:
    """The landed list: to_q/k/v/out of attn (24 x 4) and attn2 (13 x 4), none of the add_* ones."""
    count = count_lora(sd35_medium_transformer(), ATTENTION_PROJECTIONS, 32, 64.0)
    assert count.modules == 24 * 4 + 13 * 4 == 148
    assert count.parameters == 148 * 32 * 2 * WIDTH


@pytest.mark.parametrize("family", ["zeroth-order", "first-order"])
def test_sd15_lora_wraps_every_attention_projection(family: str) -> None:
    spec = PUBLISHED_LORA[("sd15", family)]
    count = count_lora(sd15_unet(), spec.targets, spec.rank, spec.alpha)
    assert count.modules == 16 * 2 * 4
    assert count.parameters == sd15_lora_parameters(spec.rank)
    assert sd15_lora_parameters(16) == 3_188_736
