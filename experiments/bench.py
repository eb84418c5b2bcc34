"""`make bench`: what one epoch of each Figure 3 arm costs at tiny scale, measured.

For each arm: a warm-up epoch, then the median over epochs of the wall-clock split (sampling, reward,
training) and the rollout NFE per parent trajectory, next to the theoretical minimum (the trunk plus
each child's ODE tail, our sampler) and to what the published sampler spends on the same profile:
it recomputes the trunk output once per child and pads every batch of its branch and tail passes to
whole chunks of 12 rows at 4 parents per call (spec §5). Writes results/tables/bench_zo_flow.md and
.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from experiments.cli import run
from experiments.fig3 import ARMS
from experiments.run import build_arm, sections
from experiments.sweep import SweepConfig, arm_config
from rsm_core import profiles
from rsm_core.config import load_config
from rsm_core.records import atomic_write_text
from rsm_core.trainer import Trainer

CONFIGS = Path(__file__).parent / "configs" / "fig3"
PUBLISHED_PARENTS, PUBLISHED_CHUNK = 4, 12  # the published sampler's collection batch and chunk


def bench_arm(overrides: list[str], epochs: int, scale: str = "tiny") -> dict:
    config = arm_config(load_config(SweepConfig, CONFIGS / f"{scale}.yaml"), overrides, seed=0)
    resolved = sections(config)
    trainer = Trainer([build_arm(config)], resolved.run.loop)
    samples = []
    for epoch in range(epochs + 1):
        before = trainer.budget.state()
        trainer.train_epoch()
        after = trainer.budget.state()
        if epoch == 0:
            continue  # warm-up: first-call allocations and the prompt-encoding cache
        seconds = {k: after["seconds"][k] - before["seconds"][k] for k in ("sample", "reward", "train")}
        samples.append({**seconds, "nfe": after["nfe"] - before["nfe"]})
    arm = resolved.arm
    parents = arm.prompts_per_epoch * arm.seeds_per_prompt
    profile = profiles.named(arm.profile)
    median = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    return {
        "profile": arm.profile,
        "k": list(profile.k),
        "parents_per_epoch": parents,
        "rows_per_epoch": parents * profile.total,
        "sample_s": median["sample"],
        "reward_s": median["reward"],
        "train_s": median["train"],
        "epoch_s": median["sample"] + median["reward"] + median["train"],
        "nfe_per_parent": median["nfe"] / parents,
        "nfe_minimum": profile.nfe_per_parent(arm.sampler_steps),
        "nfe_published": profile.published_nfe_per_parent(
            arm.sampler_steps, PUBLISHED_PARENTS, PUBLISHED_CHUNK
        ),
    }


def markdown(results: dict[str, dict], epochs: int, scale: str) -> str:
    lines = [
        f"# Per-epoch cost of the Figure 3 arms ({scale} scale, median of {epochs} epochs after a warm-up)",
        "",
        "| arm | profile | rows/epoch | sampling s | reward s | training s | epoch s | NFE/parent "
        "(measured) | NFE/parent (minimum) | NFE/parent (published sampler) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        lines.append(
            f"| {arm} | {r['profile']} {tuple(r['k'])} | {r['rows_per_epoch']} | {r['sample_s']:.2f} | "
            f"{r['reward_s']:.3f} | {r['train_s']:.2f} | {r['epoch_s']:.2f} | {r['nfe_per_parent']:.0f} | "
            f"{r['nfe_minimum']} | {r['nfe_published']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per arm (after one warm-up)")
    parser.add_argument("--scale", default="tiny", help="the Figure 3 scale file to measure (smoke | tiny)")
    parser.add_argument("--out", type=Path, default=Path("results/tables/bench_zo_flow"))
    args = parser.parse_args(argv)
    results = {arm: bench_arm(overrides, args.epochs, args.scale) for arm, overrides in ARMS.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(results, indent=2) + "\n")
    table = markdown(results, args.epochs, args.scale)
    atomic_write_text(args.out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    run(main)
