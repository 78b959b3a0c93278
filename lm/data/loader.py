"""A deterministic, resumable loader of length-bucketed preference batches.

Batch ``k`` is a pure function of ``(seed, k)`` and the data: with
``n = len(loader)`` batches per epoch, ``epoch, j = divmod(k, n)`` and the epoch's plan is

    order   = permutation(N)          seeded by (seed, epoch)
    order   = order[: n * B]          the N mod B left over are this epoch's remainder
    windows = order in chunks of B * sort_window, each sorted by pair length
    batches = windows cut into n batches of B, in an order permuted by the same rng

so batches hold pairs of similar length (few pad tokens, few bucket shapes) while every
epoch is a fresh shuffle. A trainer resumed at step k calls ``loader.batch(k)`` (or
``iter_batches(k)``) and gets exactly what an uninterrupted run would have. The remainder
differs per epoch, so no pair is left out of training for good; ``remainder`` says how
many pairs each epoch skips.

``shuffle=False`` (evaluation) keeps the data order, ignores the seed and, with
``drop_last=False``, ends with a smaller batch so that every pair is seen.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np

from lm.data.batching import collate
from lm.data.tokenization import TokenizedPairs


class PairLoader:
    """Fixed-size batches of :class:`~lm.data.tokenization.TokenizedPairs`.

    The batch layout is documented in :mod:`lm.data.batching`.
    """

    def __init__(
        self,
        pairs: TokenizedPairs,
        batch_size: int,
        *,
        buckets: Sequence[int],
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        sort_window: int = 32,
        drop_last: bool = True,
    ):
        if not len(pairs):
            raise ValueError("no pairs to load")
        if batch_size < 1 or sort_window < 1:
            raise ValueError(f"need batch_size, sort_window >= 1, got {batch_size}, {sort_window}")
        if shuffle and not drop_last:
            raise ValueError("shuffle=True needs drop_last=True (fixed batch shape every step)")
        if len(pairs) < batch_size and (shuffle or drop_last):
            raise ValueError(f"{len(pairs)} pairs cannot fill one batch of {batch_size}")
        self.pairs = pairs
        self.batch_size = batch_size
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.sort_window = sort_window
        self.drop_last = drop_last
        self.lengths = pairs.lengths
        if len(pairs) and self.lengths.max() > self.buckets[-1]:
            worst = int(np.argmax(self.lengths))
            raise ValueError(
                f"{pairs.source[worst]}: pair of {self.lengths[worst]} tokens exceeds the "
                f"largest bucket {self.buckets[-1]}"
            )
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.pairs), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def remainder(self) -> int:
        """Pairs left out of each epoch (a different random set each epoch when shuffled)."""
        return len(self.pairs) - len(self) * self.batch_size if self.drop_last else 0

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The pair indices of every batch of ``epoch``, in order."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        n, b = len(self), self.batch_size
        if not self.shuffle:
            order = np.arange(len(self.pairs))
            plan = [order[s : s + b] for s in range(0, len(order), b)][:n]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.pairs))[: n * b]
            window = b * self.sort_window
            for s in range(0, len(order), window):
                chunk = order[s : s + window]
                order[s : s + window] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches = order.reshape(n, b)
            plan = list(batches[rng.permutation(n)])
        self._cached = (epoch, plan)
        return plan

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch number ``step`` of the run (counting from 0 across epochs)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, j = divmod(step, len(self))
        return collate(self.pairs, self.epoch_plan(epoch)[j], self.buckets, self.pad_id)

    def iter_batches(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Batches ``start_step, start_step + 1, ...`` (forever when ``num_steps`` is None)."""
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch(step)
            step += 1


def split_indices(
    n: int, held_out: float | int, seed: int, groups: Sequence[Hashable] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split of ``range(n)``: two sorted, disjoint index arrays.

    ``held_out`` is a fraction in (0, 1) or a count; both parts must be non-empty.
    ``groups`` (one hashable key per item, e.g. its prompt) keeps each group on one side, so
    no held-out prompt is seen in training: the held-out part is then the first whole
    groups of a seeded permutation that reach the count (exceeding it by less than one group).
    """
    count = round(n * held_out) if isinstance(held_out, float) else int(held_out)
    if not 0 < count < n:
        raise ValueError(f"held_out={held_out!r} of {n} items leaves an empty split")
    rng = np.random.default_rng([seed, n])
    if groups is None:
        perm = rng.permutation(n)
        return np.sort(perm[count:]), np.sort(perm[:count])
    if len(groups) != n:
        raise ValueError(f"groups: {len(groups)} keys for {n} items")
    ids: dict[Hashable, int] = {}
    group_of = np.array([ids.setdefault(g, len(ids)) for g in groups], dtype=np.int64)
    order = rng.permutation(len(ids))
    taken = int(np.searchsorted(np.cumsum(np.bincount(group_of)[order]), count)) + 1
    held = np.isin(group_of, order[:taken])
    if held.all():
        raise ValueError(f"held_out={held_out!r} of {n} items in {len(ids)} groups (prompts) "
                         "leaves an empty split")
    return np.flatnonzero(~held), np.flatnonzero(held)
