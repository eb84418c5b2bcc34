"""`make toy-assets`: train the toy's two denoisers with the paper's settings and ship them."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from experiments.cli import run
from rsm_core.records import git
from rsm_core.toy.assets import ASSET_DIR, TrainSettings, save_denoisers
from rsm_core.toy.denoiser import train_pair


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="where to write the denoisers")
    parser.add_argument("--iterations", type=int, default=TrainSettings.iterations)
    args = parser.parse_args(argv)
    settings = TrainSettings(iterations=args.iterations)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    bar = tqdm(total=2 * settings.iterations, desc="training toy denoisers", unit="step")
    final = {}

    def progress(name: str, step: int, loss: float) -> None:
        final[name] = loss
        bar.update(1)
        bar.set_postfix(model=name, loss=f"{loss:.4f}", refresh=False)

    models = train_pair(**asdict(settings), progress=progress)
    bar.close()
    seconds = time.perf_counter() - start
    path = save_denoisers(
        models,
        settings,
        args.out,
        command=" ".join(["python -m experiments.toy_assets", *sys.argv[1:]]),
        git_sha=git("rev-parse", "HEAD") or "unknown",
        train_seconds=round(seconds, 1),
        threads=torch.get_num_threads(),
        final_loss={k: round(v, 5) for k, v in final.items()},
        torch=torch.__version__,
    )
    print(f"toy denoisers trained in {seconds / 60:.1f} min -> {path}")


if __name__ == "__main__":
    run(main)
