"""P x K batch sampler for metric learning: P identities, K images each, per batch.

Every batch holds exactly P distinct identities and K images of each, so every anchor has K-1
positives and (P-1)*K negatives in the batch. Identities are visited in a shuffled cycle and images
of an identity in their own shuffled cycle, so one epoch sees every eligible image about once.
The batch list is a pure function of (seed, epoch): every DDP rank builds the same global list and
keeps its own interleaved share (batches rank, rank + world_size, ...).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Iterator, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


class PKSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler: yields lists of P*K dataset indices (identity-major: K of identity 1, then ...).

    Use it as `DataLoader(ds, batch_sampler=PKSampler(labels, p, k))`.

    - `min_images`: identities with fewer images are never used (they cannot form a positive pair).
    - `replacement`: identities with min_images <= n < K images get all their images plus K - n
      repeats drawn at random when True; when False they are skipped (and the count is logged).
    - `batches_per_epoch`: global count across all ranks; default = eligible images // (P*K), min 1.
      Each rank yields ceil(batches_per_epoch / world_size) batches, so ranks stay in step.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        batches_per_epoch: int | None = None,
        replacement: bool = True,
        min_images: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"PKSampler needs p >= 1 and k >= 1, got p={p}, k={k}")
        if min_images < 1:
            raise ValueError(f"PKSampler min_images must be >= 1, got {min_images}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PKSampler rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"PKSampler batches_per_epoch must be >= 1, got {batches_per_epoch}")
        labels_arr = np.asarray(labels)
        if labels_arr.ndim != 1:
            raise ValueError(f"PKSampler labels must be 1-D, got shape {labels_arr.shape}")

        self.p, self.k = int(p), int(k)
        self.replacement = bool(replacement)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

        uniq, inverse = np.unique(labels_arr, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(uniq))
        groups = np.split(order, np.cumsum(counts)[:-1]) if len(uniq) else []

        too_few = int(np.sum(counts < min_images))
        under_k = [g for g in groups if min_images <= len(g) < self.k]
        if too_few:
            log.info("PKSampler: %d identities with < %d images never used", too_few, min_images)
        if under_k and not self.replacement:
            log.info("PKSampler: skipping %d identities with < K=%d images (replacement=False)", len(under_k), self.k)
        min_kept = min_images if self.replacement else max(min_images, self.k)
        # Identity-sorted, so the identity order (and hence every batch) is independent of input order.
        self.groups: list[np.ndarray] = [g for g in groups if len(g) >= min_kept]
        self.skipped_identities = len(groups) - len(self.groups)
        if len(self.groups) < self.p:
            raise ValueError(
                f"PKSampler: only {len(self.groups)} identities have enough images "
                f"(min_images={min_images}, k={self.k}, replacement={self.replacement}); need p={self.p}"
            )
        n_images = int(sum(len(g) for g in self.groups))
        self.batches_per_epoch = (
            int(batches_per_epoch) if batches_per_epoch is not None else max(1, n_images // (self.p * self.k))
        )
        self._per_rank = math.ceil(self.batches_per_epoch / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically for `epoch` (call before each epoch, like DistributedSampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._per_rank

    def _global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n_ids = len(self.groups)
        id_queue: deque[int] = deque()
        img_queues: list[deque[int]] = [deque() for _ in range(n_ids)]

        def take_distinct(queue: deque[int], n: int, refill) -> list[int]:
            # Pop n distinct items, refilling the cycle with a fresh permutation when it runs dry;
            # duplicates met across the refill boundary are deferred to the front for the next batch.
            chosen: list[int] = []
            seen: set[int] = set()
            deferred: list[int] = []
            while len(chosen) < n:
                if not queue:
                    queue.extend(refill())
                item = queue.popleft()
                if item in seen:
                    deferred.append(item)
                else:
                    seen.add(item)
                    chosen.append(item)
            queue.extendleft(reversed(deferred))
            return chosen

        batches: list[list[int]] = []
        for _ in range(self._per_rank * self.world_size):
            ids = take_distinct(id_queue, self.p, lambda: rng.permutation(n_ids).tolist())
            batch: list[int] = []
            for i in ids:
                group = self.groups[i]
                if len(group) >= self.k:
                    batch.extend(take_distinct(img_queues[i], self.k, lambda g=group: rng.permutation(g).tolist()))
                else:  # replacement=True: every image once, then random repeats to reach K
                    extra = rng.choice(group, size=self.k - len(group), replace=True)
                    batch.extend(rng.permutation(group).tolist() + extra.tolist())
            batches.append([int(x) for x in batch])
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._global_batches()[self.rank :: self.world_size]
