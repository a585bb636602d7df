"""A deterministic, resumable sampler of global batches (shared by every data-parallel rank)."""
from __future__ import annotations

import numpy as np


class ResumableSampler:
    """Yields global batches of row indices: a fresh permutation per epoch, seeded by
    ``(seed, epoch)``; a batch that runs past the end of an epoch continues into the next.
    ``state_dict()`` / ``load_state_dict()`` capture the position exactly, so a resumed run sees
    the same batches as an uninterrupted one. Rank ``r`` of ``world`` takes ``batch[r::world]``
    (see :meth:`shard`)."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if num_items <= 0:
            raise ValueError(f"num_items: expected a positive number of rows, got {num_items}")
        if batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
        self.num_items, self.batch_size, self.seed, self.shuffle = num_items, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
                          if self.shuffle else np.arange(self.num_items))
        return self._perm

    def next_batch(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            perm = self._permutation()
            take = min(self.batch_size - len(out), self.num_items - self.cursor)
            out.extend(int(x) for x in perm[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == self.num_items:
                self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        return out

    def __iter__(self):
        while True:
            yield self.next_batch()

    @staticmethod
    def shard(batch: list[int], rank: int, world: int) -> list[int]:
        return batch[rank::world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "num_items": self.num_items, "batch_size": self.batch_size}

    def load_state_dict(self, sd: dict) -> None:
        missing = [k for k in ("epoch", "cursor", "seed", "num_items") if not isinstance(sd, dict) or k not in sd]
        if missing:
            raise ValueError(f"sampler state: not a ResumableSampler state_dict (missing {', '.join(missing)})")
        if sd["num_items"] != self.num_items:
            raise ValueError(f"sampler state: saved for {sd['num_items']} rows, the dataset now has {self.num_items} "
                             "(the data or --seq-len changed since the checkpoint)")
        ep, cur = sd["epoch"], sd["cursor"]
        if not (isinstance(ep, int) and ep >= 0 and isinstance(cur, int) and 0 <= cur < self.num_items):
            # a cursor past the end took a negative slice: silently wrong batches, not an error
            raise ValueError(f"sampler state: epoch {ep!r} / cursor {cur!r} out of range for {self.num_items} rows")
        self.epoch, self.cursor, self.seed = ep, cur, sd["seed"]
        self._perm = None
