"""Embed every prompt of a figure's paper-scale runs, once, into the disk cache (`make paper-embeddings`).

Each run loads its prompts' embeddings from this cache and then frees the text encoders (T5-XXL is
about 9 GiB in half precision). Filling it here, in one process before `accelerate launch`, keeps
every GPU of the job from embedding the same prompts side by side; a run also fills what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments import fig3, fig_zo_flow
from experiments.cli import run as run_cli
from experiments.run import load_paper_backbone, prompt_sets, run_prompts, sections, training_device
from experiments.sweep import SweepConfig, arm_config
from rsm_core.config import load_config

FIGURES = {"fig3": fig3.ARMS, "fig_zo_flow": fig_zo_flow.ARMS}
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


def main(argv: list[str] | None = None) -> None:
    parser = paper_parser(__doc__)
    parser.add_argument("--allow-cpu", action="store_true", help="embed on the CPU (slow; for tests)")
    args = parser.parse_args(argv)
    cfg = load_config(SweepConfig, CONFIGS / args.figure / f"{args.scale}.yaml", overrides=args.set)
    first_arm = next(iter(FIGURES[args.figure].values()))
    settings = sections(arm_config(cfg, first_arm, seed=0)).run
    if settings.model.backbone != "sd35":
        raise SystemExit(f"error: {args.figure} at scale {args.scale} uses {settings.model.backbone}, "
                         "whose prompts need no precomputing")  # fmt: skip
    device = training_device(None, settings.model.backbone, args.allow_cpu)
    train, test = prompt_sets(settings.prompts)
    prompts = run_prompts(train, test)
    computed = load_paper_backbone(settings.model, device).precompute(prompts)
    cache = Path(settings.model.embedding_cache).expanduser()
    print(f"{computed} prompts embedded, {len(prompts) - computed} were already in {cache}")


if __name__ == "__main__":
    run_cli(main)
