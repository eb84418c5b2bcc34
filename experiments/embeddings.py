"""Embed every prompt of a figure's paper-scale runs, once, into the disk cache (`make paper-embeddings`).

Each run loads its prompts' embeddings from this cache and then frees the text encoders (T5-XXL is
about 9 GiB in half precision). Filling it here, in one process before `accelerate launch`, keeps
every GPU of the job from embedding the same prompts side by side; a run also fills what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from experiments import fig3, fig5, fig6, fig_zo_diffusion, fig_zo_flow
from experiments.cli import run as run_cli
from experiments.run import (
    PAPER_BACKBONES,
    RunConfig,
    load_paper_backbone,
    prompt_sets,
    release_memory,
    run_prompts,
    sections,
    training_device,
)
from experiments.sweep import PanelRow, SweepConfig, arm_config, arm_settings
from rsm_core.config import load_config

# each figure's arm table and, for a two-family figure, its rows (their family_overrides)
FIGURES: dict[str, tuple[dict[str, list[str]], list[PanelRow]]] = {
    "fig3": (fig3.ARMS, []),
    "fig_zo_flow": (fig_zo_flow.ARMS, []),
    "fig_zo_diffusion": (fig_zo_diffusion.ARMS, []),
    "fig5": (fig5.ARMS, fig5.ROWS),
    "fig6": (fig6.ARMS, fig6.ROWS),
}
CONFIGS = Path(__file__).parent / "configs"


def paper_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a tool about a figure's paper-scale runs (embeddings, memory plan)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figure", choices=sorted(FIGURES), default="fig3")
    parser.add_argument("--scale", default="paper", help="paper | 1gpu")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    return parser


def figure_runs(figure: str, scale: str, overrides: list[str]) -> dict[str, RunConfig]:
    """Each arm's resolved run config (seed index 0) of ``figure`` at ``scale``, as `make <figure>`
    resolves it (experiments.sweep)."""
    cfg = load_config(SweepConfig, CONFIGS / figure / f"{scale}.yaml", overrides=overrides)
    arms = arm_settings(cfg, *FIGURES[figure])
    return {arm: sections(arm_config(cfg, items, seed=0)).run for arm, items in arms.items()}


def main(argv: list[str] | None = None) -> None:
    parser = paper_parser(__doc__)
    parser.add_argument("--allow-cpu", action="store_true", help="embed on the CPU (slow; for tests)")
    args = parser.parse_args(argv)
    runs = figure_runs(args.figure, args.scale, args.set)
    # one pass per distinct model and prompt set (Figures 5/6 train SD3.5-M and SD1.5 arms)
    by_model = {
        json.dumps([dataclasses.asdict(s.model), dataclasses.asdict(s.prompts)], sort_keys=True): s
        for s in runs.values()
        if s.model.backbone in PAPER_BACKBONES
    }
    if not by_model:
        backbones = sorted({s.model.backbone for s in runs.values()})
        raise SystemExit(f"error: {args.figure} at scale {args.scale} uses {backbones}, "
                         "whose prompts need no precomputing")  # fmt: skip
    for settings in by_model.values():
        device = training_device(None, settings.model.backbone, args.allow_cpu)
        train, test = prompt_sets(settings.prompts)
        prompts = run_prompts(train, test)
        computed = load_paper_backbone(settings.model, device).precompute(prompts)
        release_memory()  # the backbone before the next family's
        cache = Path(settings.model.embedding_cache).expanduser()
        print(
            f"{settings.model.backbone}: {computed} prompts embedded, {len(prompts) - computed} were already "
            f"in {cache}"
        )


if __name__ == "__main__":
    run_cli(main)
