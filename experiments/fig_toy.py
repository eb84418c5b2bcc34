"""`make fig-toy`: the toy value-gradient-estimator figure (paper Fig. 8 (b), (c-i), (c-ii), (c-iii)).

One run = one directory under results/runs/ holding the resolved config, env.json, the study's rows in
metrics.jsonl (one row per plotted point) and, with --retrain, the trained denoisers. The figure is
then drawn from that directory. SCALE picks experiments/configs/fig_toy/<scale>.yaml; --set key=value
overrides any config key.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

from experiments.cli import run
from experiments.fig_toy_config import FigToyConfig, Mode
from experiments.plot import plot_fig_toy, toy_frame
from experiments.toy_study import Denoise, StudySettings, ToyStudy
from rsm_core.config import load_config
from rsm_core.records import RunRecord
from rsm_core.toy.assets import TrainSettings, load_denoisers
from rsm_core.toy.denoiser import train_pair
from rsm_core.toy.mixture import UnitMixture, reward_gradient, toy_alphas_cumprod

CONFIG_DIR = Path(__file__).parent / "configs" / "fig_toy"
STAGES = ("full rollout", "panel b", "panel c-i", "panel c-ii", "panel c-iii")


def oracle_denoisers() -> dict[str, Denoise]:
    """Exact epsilon predictions of p* ("ft") and p_ref ("base") from the mixture's closed form."""
    abar = toy_alphas_cumprod()
    reference = UnitMixture.reference()
    mixtures = {"ft": reference.tilted(reward_gradient()), "base": reference}
    return {name: (lambda x, t, m=m: m.eps(x, float(abar[t]))) for name, m in mixtures.items()}


def learned_denoisers(cfg, run: RunRecord, device: str) -> dict[str, Denoise]:
    """The shipped pair (hash-checked), or a freshly trained pair saved into the run directory."""
    settings = TrainSettings(**cfg.train)
    if cfg.retrain:
        bar = tqdm(total=2 * settings.iterations, desc="training denoisers", unit="step")
        models = train_pair(
            settings.iterations,
            settings.batch_size,
            settings.lr,
            settings.seed,
            progress=lambda name, step, loss: bar.update(1),
        )
        bar.close()
        for name, model in models.items():
            run.save_tensors(f"denoiser_{name}.safetensors", model.state_dict())
    else:
        models = load_denoisers(settings)
    for model in models.values():
        model.to(device).requires_grad_(False)
    return {name: (lambda x, t, m=m: m(x, t)) for name, m in models.items()}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def study_settings(cfg, device: str) -> StudySettings:
    oracle = cfg.mode == Mode.oracle
    return StudySettings(
        points=cfg.points,
        log2_samples=tuple(cfg.log2_samples),
        zm_reference_log2=cfg.zm_reference_log2,
        lookahead_ratios=tuple(cfg.lookahead_ratios),
        branch_patterns=tuple(tuple(p) for p in cfg.branch_patterns),
        scale_convention=cfg.scale_convention.value,
        soft_return=cfg.soft_return,
        max_rows=cfg.max_rows,
        seed=cfg.seed,
        dtype=torch.float64 if oracle else torch.float32,
        device=device,
    )


def figure_stem(figures_dir: Path, scale: str, mode: Mode) -> Path:
    """results/figures/fig_toy for real scales; smoke runs go to a subfolder so they never replace it."""
    name = "fig_toy" if mode == Mode.trained else f"fig_toy_{mode.value}"
    return (figures_dir / "smoke" if scale == "smoke" else figures_dir) / name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", default="tiny", help="smoke | tiny | paper (experiments/configs/fig_toy/*.yaml)"
    )
    parser.add_argument("--mode", choices=[m.value for m in Mode], help="trained (default) or oracle")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--name", help="run directory name (default: fig_toy-<scale>-<mode>-<time>)")
    parser.add_argument("--runs-dir", type=Path, default=Path("results/runs"))
    parser.add_argument("--figures-dir", type=Path, default=Path("results/figures"))
    args = parser.parse_args(argv)

    overrides = ([f"mode={args.mode}"] if args.mode else []) + args.set
    cfg = load_config(FigToyConfig, CONFIG_DIR / f"{args.scale}.yaml", overrides=overrides)
    name = args.name or f"fig_toy-{args.scale}-{cfg.mode.value}-{datetime.now():%Y%m%d-%H%M%S}"
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    with RunRecord.create(args.runs_dir, name, cfg, wandb=cfg.wandb) as run:
        denoisers = oracle_denoisers() if cfg.mode == Mode.oracle else learned_denoisers(cfg, run, device)
        study = ToyStudy(denoisers["ft"], denoisers["base"], study_settings(cfg, device))
        with tqdm(total=len(STAGES), desc="toy estimators", unit="stage") as bar:

            def progress(stage: str) -> None:
                bar.n = STAGES.index(stage)  # stages finished so far
                bar.set_postfix_str(stage)

            rows = study.rows(study.run(progress))
            bar.n = len(STAGES)
            bar.refresh()
        for row in rows:
            run.log(row)
        seconds = time.perf_counter() - started
        run.finish({"rows": len(rows), "seconds": round(seconds, 1)})
    stem = figure_stem(args.figures_dir, args.scale, cfg.mode)
    paths = plot_fig_toy(toy_frame(run.path), stem, title=f"toy estimators — {args.scale}, {cfg.mode.value}")
    print(
        f"fig-toy done in {seconds / 60:.1f} min: run {run.path}; figure " + ", ".join(str(p) for p in paths)
    )


if __name__ == "__main__":
    run(main)
