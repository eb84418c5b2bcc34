"""`make tiny-assets`: pretrain the tiny world deterministically and ship it.

Order: the tiny CLIP (its text tower becomes the frozen text encoder of both backbones), the
aesthetic scorer, the tiny flow model, the tiny diffusion model. Writes safetensors and a manifest
(sha256, command, git sha, settings, seconds and final losses per model) to rsm_core/world/assets/.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from experiments import tiny_check
from experiments.cli import run
from experiments.tiny_world import World, save_world
from reward_models.shapes_aesthetic import train_aesthetic
from reward_models.shapes_clip import train_clip
from reward_models.world import RewardNets
from rsm_core.records import git
from rsm_core.world import prompts
from rsm_core.world.assets import ASSET_DIR, build_backbones
from rsm_core.world.dataset import SceneSampler
from rsm_core.world.pretrain import PretrainSettings, pretrain


@dataclass(frozen=True)
class AssetSettings:
    clip_steps: int = 1000
    clip_batch: int = 128
    aesthetic_steps: int = 1500
    aesthetic_batch: int = 64
    flow_steps: int = 2000
    diffusion_steps: int = 1100
    backbone_batch: int = 64
    balance_tags: bool = True  # uniform over GenEval tags, not prompts (90 of 147 are colour attribution)
    seed: int = 0


SMOKE = AssetSettings(
    clip_steps=3,
    clip_batch=16,
    aesthetic_steps=3,
    aesthetic_batch=8,
    flow_steps=2,
    diffusion_steps=2,
    backbone_batch=4,
)


def _bar(name: str, total: int, losses: dict[str, float]):
    bar = tqdm(total=total, desc=f"training {name}", unit="step")

    def progress(step: int, loss: float) -> None:
        losses[name] = loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    return bar, progress


def train_world(settings: AssetSettings) -> tuple[World, dict]:
    # The world's "web corpus": every caption of the world, tag-balanced. The reference models and the
    # learned rewards are pretrained on it, as SD3.5 and CLIP saw GenEval-like captions on the web;
    # the disjoint train/test prompt splits are for fine-tuning and evaluation.
    scenes = SceneSampler(prompts.all_metadata(), balance_tags=settings.balance_tags)
    losses: dict[str, float] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, total: int, fn):
        start = time.perf_counter()
        bar, progress = _bar(name, total, losses)
        result = fn(progress)
        bar.close()
        seconds[name] = round(time.perf_counter() - start, 1)
        return result

    clip, _ = timed(
        "clip",
        settings.clip_steps,
        lambda p: train_clip(
            prompts.vocabulary(),
            lambda g, n: scenes(g, n)[:2],
            settings.clip_steps,
            settings.clip_batch,
            seed=settings.seed,
            progress=p,
        ),
    )
    aesthetic, _ = timed(
        "aesthetic",
        settings.aesthetic_steps,
        lambda p: train_aesthetic(
            lambda g, n: scenes(g, n)[0],
            settings.aesthetic_steps,
            settings.aesthetic_batch,
            seed=settings.seed,
            progress=p,
        ),
    )
    world = World(build_backbones(clip.text), RewardNets(clip, aesthetic))
    for name, backbone, steps in (
        ("flow", world.flow, settings.flow_steps),
        ("diffusion", world.diffusion, settings.diffusion_steps),
    ):
        backbone_settings = PretrainSettings(steps=steps, batch=settings.backbone_batch, seed=settings.seed)
        timed(name, steps, lambda p, b=backbone, s=backbone_settings: pretrain(b, scenes, s, progress=p))
    return world, {"seconds": seconds, "final_loss": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where to write the weights")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each model (for tests)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else AssetSettings()
    start = time.perf_counter()
    world, stats = train_world(settings)
    provenance = {
        "command": " ".join(["python -m experiments.tiny_assets", *(sys.argv[1:] if argv is None else argv)]),
        "git_sha": git("rev-parse", "HEAD"),
        "settings": asdict(settings),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - start, 1),
        **stats,
    }
    manifest = save_world(world, args.out, provenance)
    print(f"wrote {manifest} ({provenance['total_seconds'] / 60:.1f} min); measuring its quality")
    check = ["--assets", str(args.out), "--record-quality"]
    tiny_check.main([*check, "--smoke", "--results", str(args.out / "smoke_check")] if args.smoke else check)


if __name__ == "__main__":
    run(main)
