"""The whole tiny world for the scripts that train and measure it: the reference backbones and their
text encoder (rsm_core.world) and the learned reward networks (reward_models.world)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reward_models.world import RewardNets, load_reward_nets
from rsm_core.backbones.tiny import TinyDiffusion, TinyFlow
from rsm_core.interfaces import Reward
from rsm_core.world.assets import ASSET_DIR, Backbones, load_backbones, save_assets


@dataclass
class World:
    backbones: Backbones
    nets: RewardNets

    @property
    def flow(self) -> TinyFlow:
        return self.backbones.flow

    @property
    def diffusion(self) -> TinyDiffusion:
        return self.backbones.diffusion

    @property
    def rewards(self) -> dict[str, Reward]:
        return self.nets.rewards()


def load_world(directory: Path = ASSET_DIR) -> World:
    return World(load_backbones(directory), load_reward_nets(directory))


def save_world(world: World, directory: Path, provenance: dict) -> Path:
    modules = {
        "clip": world.nets.clip,
        "aesthetic": world.nets.aesthetic,
        "flow": world.flow.model,
        "diffusion": world.diffusion.model,
    }
    return save_assets(modules, directory, provenance)
