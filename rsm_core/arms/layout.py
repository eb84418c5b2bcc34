"""Who samples what in an epoch of the published SD1.5 zeroth-order trainers (zo_diffusion spec §3.1).

Both PCPO and its sparse-branching redesign draw the epoch's prompts with a shuffled distributed
sampler over the prompt file (reseeded every epoch, disjoint shards), repeat each prompt
contiguously, and start whole sampling batches from two shared initial latents. Both arms that run
them (the trajectory arm and the branching arm) take these two pieces from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def epoch_prompts(
    prompts: Sequence[dict], seed: int, epoch: int, rank: int, world: int, count: int, repeats: int
) -> list[dict]:
    """Shard ``rank``'s prompts of ``epoch``: a permutation of the file seeded ``seed + epoch`` (the
    same on every shard), padded by wrapping to a multiple of ``world`` and dealt out rank::world (a
    torch DistributedSampler with shuffle and set_epoch); the first ``count`` of the shard, each
    repeated ``repeats`` times in a row."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    total = -(-len(order) // world) * world
    order = [order[i % len(order)] for i in range(total)]  # wraps as often as needed, as torch's does
    mine = order[rank:total:world][:count]
    if len(mine) < count:
        raise ValueError(
            f"a shard needs {count} prompts per epoch but the {len(prompts)} training prompts give each "
            f"of {world} shards {len(mine)}; lower prompts_per_epoch or use a larger prompt file"
        )
    return [prompts[i] for i in mine for _ in range(repeats)]


def shared_initial_noise(
    calls: int, batch: int, shape: Sequence[int], generator: torch.Generator
) -> list[Tensor]:
    """The start of each of the epoch's ``calls`` sampling batches: two draws A and B per epoch, each
    broadcast over a whole batch; the first calls // 2 batches start from A, the others from B."""
    first = torch.randn(1, *shape, generator=generator)
    second = torch.randn(1, *shape, generator=generator)
    return [(first if call < calls // 2 else second).expand(batch, *shape).clone() for call in range(calls)]
