"""Latents to rewards a chunk at a time, optionally in worker threads.

A 512 px SD3.5 VAE decode of a collection call's 216 children at once needs tens of GiB of
activations; the published code decodes (and scores) 12 at a time. Every arm scores through here,
so the chunk is one config value (``decode_chunk``) and results do not depend on it beyond rounding.

Black-box rewards are slow for reasons that leave the accelerator idle (a GenEval server over HTTP,
a CPU model); the published code therefore hands each decoded chunk to a pool of 8 threads and goes
on sampling, waiting for the scores only before training. ``ScoreQueue`` does the same with
``workers`` > 0; the scores are identical, only the schedule changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from rsm_core.interfaces import Backbone, Reward

Scores = dict[str, Tensor]


class ScoreQueue:
    """Decodes in the caller's thread (the accelerator's work stays in order) and scores each chunk
    there (``workers`` = 0) or in a thread pool; ``results`` returns the scores in submission order.

    Use as a context manager so that the pool is shut down even when sampling fails."""

    def __init__(self, backbone: Backbone, rewards: Mapping[str, Reward], chunk: int, workers: int = 0):
        if chunk < 1 or workers < 0:
            raise ValueError(f"chunk must be at least 1 and workers at least 0, got {chunk} and {workers}")
        self.backbone, self.rewards, self.chunk = backbone, dict(rewards), chunk
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="reward") if workers else None
        self.pending: list[Future[Scores] | Scores] = []

    def __enter__(self) -> ScoreQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, latents: Tensor, prompts: Sequence[str], metas: Sequence[dict]) -> None:
        for start in range(0, len(latents), self.chunk):
            end = start + self.chunk
            images = self.backbone.decode(latents[start:end])
            chunk_prompts, chunk_metas = list(prompts[start:end]), list(metas[start:end])
            if self.pool is None:
                self.pending.append(self._score(images, chunk_prompts, chunk_metas))
                continue
            self._bound_waiting()
            self.pending.append(self.pool.submit(self._score, images, chunk_prompts, chunk_metas))

    def _bound_waiting(self) -> None:
        """Waits while 2 x workers chunks are unscored, so that decoded images held for slow rewards
        (36 MiB per 12 at 512 px) stay bounded however far sampling runs ahead."""
        waiting = [part for part in self.pending if isinstance(part, Future) and not part.done()]
        if len(waiting) >= 2 * self.workers:
            waiting[0].result()

    def _score(self, images: Tensor, prompts: list[str], metas: list[dict]) -> Scores:
        # grad mode is per thread: a worker would otherwise record graphs through the reward models
        with torch.no_grad():
            return {
                name: reward(images, prompts, metas).detach().float().cpu()
                for name, reward in self.rewards.items()
            }

    def results(self) -> Scores:
        """Each reward's float32 scores (on the CPU) of everything submitted, waiting for the workers."""
        done = [part.result() if isinstance(part, Future) else part for part in self.pending]
        self.pending = []
        return {
            name: torch.cat([part[name] for part in done]) if done else torch.zeros(0)
            for name in self.rewards
        }


def decode_and_score(
    backbone: Backbone,
    rewards: Mapping[str, Reward],
    latents: Tensor,
    prompts: Sequence[str],
    metas: Sequence[dict],
    chunk: int,
) -> Scores:
    """Each reward's float32 scores (on the CPU) of the decoded ``latents``, ``chunk`` images at a time."""
    with ScoreQueue(backbone, rewards, chunk) as queue:
        queue.submit(latents, prompts, metas)
        return queue.results()
