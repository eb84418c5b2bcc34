"""`make tiny-check`: measure the shipped tiny world (no retraining).

Writes results/tables/tiny_check.json (detector accuracy on clean renders per tag, the reference
models' shapes_geneval / aesthetic / clip scores on the test prompts with ODE sampling at the default
steps and CFG, and the per-timestep branch-variance diagnostic for every reward and both backbones),
results/figures/tiny_samples.png and results/figures/tiny_reward_sensitivity.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from tqdm import tqdm

from experiments.cli import run
from experiments.tiny_world import World, load_world
from reward_models.shapes_geneval import ShapesGenEval
from rsm_core.records import atomic_write_text
from rsm_core.world import prompts
from rsm_core.world.assets import ASSET_DIR, SAMPLING, update_manifest
from rsm_core.world.diagnostics import branch_reward_variance
from rsm_core.world.scenes import render_batch, sample_scene

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.plot import save_figure  # noqa: E402


@dataclass(frozen=True)
class CheckSettings:
    seeds_per_prompt: int = 4
    detector_scenes_per_tag: int = 100
    diagnostic_parents: int = 24
    diagnostic_children: int = 8
    diagnostic_steps: int = 10  # the SDE grid the branching methods train on (SD3.5's 10 steps)
    sample_grid_prompts: int = 12
    seed: int = 0


SMOKE = CheckSettings(1, 4, 2, 2, 3, 4)


def detector_accuracy(settings: CheckSettings, test: list[dict]) -> dict[str, float]:
    """Strict shapes_geneval on clean renders of test prompts, per tag."""
    rng = np.random.default_rng(settings.seed)
    detector, accuracy = ShapesGenEval(), {}
    for tag in prompts.TAGS:
        metas = [m for m in test if m["tag"] == tag]
        picks = [metas[i] for i in rng.integers(len(metas), size=settings.detector_scenes_per_tag)]
        images = render_batch([sample_scene(m, rng) for m in picks])
        accuracy[tag] = float(detector(images, [m["prompt"] for m in picks], picks).mean())
    return accuracy


def reference_scores(
    world: World, settings: CheckSettings, test: list[dict]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per backbone: mean strict/partial GenEval, aesthetic and clip on ODE samples of every test prompt."""
    metas = [m for m in test for _ in range(settings.seeds_per_prompt)]
    texts = [m["prompt"] for m in metas]
    rewards = world.rewards
    strict = ShapesGenEval("strict")
    scores, samples = {}, {}
    for name, backbone in (("flow", world.flow), ("diffusion", world.diffusion)):
        sampling = SAMPLING[name]
        generator = torch.Generator().manual_seed(settings.seed)
        images = torch.cat(
            [
                backbone.decode(
                    backbone.sample_ode(texts[i : i + 64], sampling.steps, sampling.cfg, generator)
                )
                for i in tqdm(range(0, len(texts), 64), desc=f"sampling {name}", unit="batch")
            ]
        )
        samples[name] = images
        with torch.no_grad():
            per_tag = strict.evaluate(images, metas)
            scores[name] = {
                # GenEval's overall score: the mean over tags of each tag's strict accuracy
                "geneval": per_tag["overall"]["strict"],
                "geneval_partial": per_tag["overall"]["partial"],
                "geneval_sample_mean": float(strict(images, texts, metas).mean()),
                "geneval_per_tag": per_tag,
                "aesthetic": float(rewards["shapes_aesthetic"](images, texts).mean()),
                "clip": float(rewards["shapes_clip"](images, texts).mean()),
            }
    return scores, samples


def diagnostic(world: World, settings: CheckSettings, test: list[dict]) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(settings.seed)
    metas = [test[i] for i in rng.choice(len(test), size=settings.diagnostic_parents, replace=False)]
    texts = [m["prompt"] for m in metas]
    rewards = {name: world.rewards[name] for name in ("shapes_geneval", "shapes_aesthetic", "shapes_clip")}
    out = {}
    for name, backbone in tqdm((("flow", world.flow), ("diffusion", world.diffusion)), desc="diagnostic"):
        variances = branch_reward_variance(
            backbone,
            rewards,
            texts,
            metas,
            settings.diagnostic_steps,
            settings.diagnostic_children,
            SAMPLING[name].cfg,
            torch.Generator().manual_seed(settings.seed),
        )
        times = backbone.grid_times(settings.diagnostic_steps)
        step_std = backbone.flow.sde_grid(settings.diagnostic_steps).kernel.nu
        out[name] = {
            "t": times.tolist(),
            "step_std": step_std.tolist(),
            **{k: v.tolist() for k, v in variances.items()},
        }
    return out


def plot_samples(
    samples: dict[str, torch.Tensor], texts: list[str], settings: CheckSettings, out: Path
) -> None:
    n = settings.sample_grid_prompts
    picks = list(range(0, len(texts), settings.seeds_per_prompt))[:n]
    fig, axes = plt.subplots(2, len(picks), figsize=(1.6 * len(picks), 3.8), squeeze=False)
    for row, (name, images) in enumerate(samples.items()):
        for col, i in enumerate(picks):
            ax = axes[row, col]
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(texts[i].removeprefix("a photo of "), fontsize=6)
            if col == 0:
                ax.set_ylabel(f"tiny {name}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, pd.DataFrame({"prompt": [texts[i] for i in picks]}), out)


def sensitivity_frame(diag: dict) -> pd.DataFrame:
    """One row per (backbone, reward, step): the branch variance, its share of the sum over steps, and
    the share of variance / nu_i^2 (the noise of a one-child Stein guidance estimate at that step, the
    paper's Eq. 19 argument) over the steps a branching method trains (all but the last, whose tiny
    nu_i would dominate the sum)."""
    rows = []
    for backbone, d in diag.items():
        std = d["step_std"]
        for reward, values in d.items():
            if reward in ("t", "step_std"):
                continue
            per_noise = [v / s**2 for v, s in zip(values[:-1], std[:-1], strict=True)] + [float("nan")]
            for i, (t, v, p) in enumerate(zip(d["t"], values, per_noise, strict=True)):
                rows.append(
                    {
                        "backbone": backbone,
                        "reward": reward,
                        "step": i,
                        "t": t,
                        "variance": v,
                        "share": v / max(sum(values), 1e-12),
                        "per_noise_share": p / max(sum(per_noise[:-1]), 1e-12),
                    }
                )
    return pd.DataFrame(rows)


def snr_split(frame: pd.DataFrame) -> dict:
    """Where each reward is decided, as the share-weighted mean branching step over the trained steps
    (0 = pure noise), raw and per unit noise (None when the reward never varied); the split holds for a
    backbone when shapes_geneval's mean step is earlier (lower SNR) than shapes_aesthetic's in both."""
    trained = frame[frame["step"] < frame.groupby("backbone")["step"].transform("max")]

    def mean_step(curve: pd.DataFrame, view: str) -> float | None:
        total = float(curve[view].sum())
        return float((curve["step"] * curve[view]).sum() / total) if total > 0 else None

    out: dict = {}
    for backbone, part in trained.groupby("backbone", sort=False):
        means = {
            view: {reward: mean_step(curve, view) for reward, curve in part.groupby("reward", sort=False)}
            for view in ("share", "per_noise_share")
        }
        out[backbone] = {
            "mean_step": means["share"],
            "mean_step_per_noise": means["per_noise_share"],
            "split_holds": all(
                m["shapes_geneval"] is not None
                and m["shapes_aesthetic"] is not None
                and m["shapes_geneval"] < m["shapes_aesthetic"]
                for m in means.values()
            ),
        }
    return out


def plot_sensitivity(frame: pd.DataFrame, out: Path) -> None:
    """Top: each reward's share of branch variance per step. Bottom: the same per unit noise variance."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, (backbone, part) in enumerate(frame.groupby("backbone", sort=False)):
        for reward, curve in part.groupby("reward", sort=False):
            axes[0, col].plot(curve["step"], curve["share"], marker="o", label=reward)
            axes[1, col].plot(curve["step"], curve["per_noise_share"], marker="o", label=reward)
        axes[0, col].set_title(f"tiny {backbone}")
        axes[0, col].set_ylabel("branch reward variance\n(share of the sum over steps)")
        axes[1, col].set_ylabel("variance / nu_i^2\n(share of the sum over steps)")
        axes[1, col].set_xlabel("branching step (0 = pure noise, low SNR)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Which timesteps decide each reward (branch-variance diagnostic)")
    fig.tight_layout()
    save_figure(fig, frame, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--assets", type=Path, default=ASSET_DIR)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--smoke", action="store_true", help="tiny counts (for tests)")
    parser.add_argument(
        "--record-quality",
        action="store_true",
        help="also write the headline numbers into the assets' manifest",
    )
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else CheckSettings()
    start = time.perf_counter()
    world = load_world(args.assets)
    _, test = prompts.split()
    accuracy = detector_accuracy(settings, test)
    scores, samples = reference_scores(world, settings, test)
    diag = diagnostic(world, settings, test)
    sensitivity = sensitivity_frame(diag)
    report = {
        "detector_accuracy_min": min(accuracy.values()),
        "detector_accuracy": accuracy,
        **{f"{b}_{k}": v for b, s in scores.items() for k, v in s.items()},
        "diagnostic_variance": diag,
        "snr_split": snr_split(sensitivity),
        "settings": asdict(settings),
        "sampling": {k: asdict(v) for k, v in SAMPLING.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    table = args.results / "tables" / "tiny_check.json"
    table.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table, json.dumps(report, indent=2) + "\n")
    texts = [m["prompt"] for m in test for _ in range(settings.seeds_per_prompt)]
    plot_samples(samples, texts, settings, args.results / "figures" / "tiny_samples")
    plot_sensitivity(sensitivity, args.results / "figures" / "tiny_reward_sensitivity")
    if args.record_quality:
        headline = {k: v for k, v in report.items() if not isinstance(v, dict) and k != "seconds"}
        update_manifest(args.assets, quality={**headline, "detector_accuracy": accuracy})
    print(f"wrote {table} and the tiny_samples / tiny_reward_sensitivity figures ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    run(main)
