"""The one batch order both kinds of data follow, and the cuts of a training split.

Owns seeded generators (`generator`), the batch plan of an epoch (`batch_plan`),
class-balanced subsets and the subset rule, and `steps_per_epoch`. Imports mgrow.errors.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ..errors import MgrowError


def generator(*key: int) -> torch.Generator:
    """Return a CPU generator seeded from a tuple of non-negative ints."""
    seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def balanced_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Return the indices, in file order, of the first n images taken round-robin over classes.

    Example: labels [1, 1, 0, 1, 0], n = 3 -> [0, 2, 4] (class 0's first (2), class 1's
    first (0), class 0's second (4)).
    """
    rank = torch.empty_like(labels)  # how many earlier images share this image's class
    for c in labels.unique():
        where = (labels == c).nonzero().squeeze(1)
        rank[where] = torch.arange(len(where))
    key = rank * (int(labels.max()) + 1) + labels  # round-robin order: by rank, then by class
    return key.argsort()[:n].sort().values


def steps_per_epoch(data, batch_size: int) -> int:
    """Return the number of full global batches in one pass over `data`'s training split."""
    return len(data.train_y) // batch_size


def batch_plan(n: int, train: bool, batch_size: int, epoch: int, seed: int, rank: int = 0,
               world: int = 1, start: int = 0) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield, per global batch from `start` on, (this rank's slice of the batch, the image
    indices (b,) int64 in that slice): the one order both kinds of data follow.

    Training: a permutation of the n images drawn from (seed, epoch), cut into full global
    batches (the last incomplete one dropped). Evaluation: file order, every image. Rank r
    of `world` gets the r-th contiguous slice of each global batch, and no batch where that
    slice is empty (the last evaluation batch, holding fewer images than ranks; a training
    batch, divided evenly by the engine, never is).
    """
    order = torch.randperm(n, generator=generator(seed, 0, epoch)) if train else None
    count = n // batch_size if train else -(-n // batch_size)
    for b in range(start, count):
        lo = b * batch_size
        size = min(n, lo + batch_size) - lo
        r0, r1 = size * rank // world, size * (rank + 1) // world  # this rank's slice
        if r0 == r1:  # a loader cannot collate an empty batch
            continue
        idx = order[lo + r0:lo + r1] if train else torch.arange(lo + r0, lo + r1)
        yield slice(r0, r1), idx


def subset_size(subset: int | None, n: int, spec: str, at_most: bool = False) -> int | None:
    """Return how many of `n` training images `subset` keeps (None: all of them); more than
    `n` is refused, or (`at_most`: a ceiling, not a demand) keeps all."""
    if subset is None or at_most and subset >= n:
        return None
    if subset > n:
        raise MgrowError(f"--subset {subset} exceeds the {n} training images of {spec}")
    return subset
