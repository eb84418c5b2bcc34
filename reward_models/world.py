"""The tiny world's rewards, loaded from the shipped weights (hash-checked by rsm_core.world.assets).

- ``shapes_geneval`` (partial score, the training reward) and ``shapes_geneval_strict``: the black-box
  detector, no weights;
- ``shapes_aesthetic``: the learned appearance scorer;
- ``shapes_clip`` and ``shapes_hps``: the tiny CLIP's image-text score, alone and with the aesthetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reward_models.shapes_aesthetic import AestheticNet, ShapesAesthetic
from reward_models.shapes_clip import ShapesCLIP, ShapesHPS, TinyCLIP
from reward_models.shapes_geneval import ShapesGenEval
from rsm_core.interfaces import Reward
from rsm_core.world import prompts
from rsm_core.world.assets import ASSET_DIR, load_state


@dataclass
class RewardNets:
    """The learned networks behind the tiny world's rewards."""

    clip: TinyCLIP
    aesthetic: AestheticNet

    def rewards(self) -> dict[str, Reward]:
        clip, aesthetic = ShapesCLIP(self.clip), ShapesAesthetic(self.aesthetic)
        return {
            "shapes_geneval": ShapesGenEval("partial"),
            "shapes_geneval_strict": ShapesGenEval("strict"),
            "shapes_aesthetic": aesthetic,
            "shapes_clip": clip,
            "shapes_hps": ShapesHPS(clip, aesthetic),
        }


def load_reward_nets(directory: Path = ASSET_DIR) -> RewardNets:
    clip, aesthetic = TinyCLIP(prompts.vocabulary()), AestheticNet()
    clip.load_state_dict(load_state("clip", directory))
    aesthetic.load_state_dict(load_state("aesthetic", directory))
    for module in (clip, aesthetic):
        module.requires_grad_(False).eval()
    return RewardNets(clip, aesthetic)


def world_rewards(directory: Path = ASSET_DIR) -> dict[str, Reward]:
    """Every tiny-world reward by name (scores images of the tiny backbones)."""
    return load_reward_nets(directory).rewards()
