"""Padding pairs into fixed-shape batches: length buckets, masks, reference log-probs.

A batch of B pairs padded to a bucket length T (numpy arrays):

    input_ids      int32 [B, 2, T]  [i, 0] = prompt + chosen, [i, 1] = prompt + rejected
    attention_mask int32 [B, 2, T]  1 on real tokens, 0 on padding (right-padded)
    loss_mask      int32 [B, 2, T]  1 on response tokens (EOS included when kept), 0 on
                                    prompt and padding
    index          int32 [B]        position of each pair in its TokenizedPairs

Masks are aligned with ``input_ids`` (token positions): the log-prob of token t comes
from the logits at t - 1, a shift the loss applies. T is the smallest bucket that holds
the longest sequence in the batch, so ``jit`` sees only ``len(buckets)`` shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lm.data.tokenization import TokenizedPairs


def bucket_lengths(
    max_len: int, *, smallest: int = 16, multiple_of: int | None = None
) -> tuple[int, ...]:
    """The fixed set of padded lengths, ending at ``max_len``.

    Powers of two from ``smallest`` (default), or multiples of ``multiple_of``; values
    at or above ``max_len`` are replaced by ``max_len`` itself.
    """
    if max_len < 1 or smallest < 1:
        raise ValueError(f"need max_len >= 1 and smallest >= 1, got {max_len}, {smallest}")
    if multiple_of is not None:
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        sizes = range(multiple_of, max_len, multiple_of)
    else:
        sizes, size = [], smallest
        while size < max_len:
            sizes.append(size)
            size *= 2
    return (*sizes, max_len)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length`` (``buckets`` sorted ascending)."""
    i = int(np.searchsorted(np.asarray(buckets), length, side="left"))
    if i == len(buckets):
        raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
    return int(buckets[i])


def collate(
    pairs: TokenizedPairs, indices: Sequence[int] | np.ndarray, buckets: Sequence[int], pad_id: int
) -> dict[str, np.ndarray]:
    """The batch of the pairs at ``indices``, padded to their bucket (module docstring)."""
    indices = np.asarray(indices, dtype=np.int32)
    longest = max(
        len(pairs.prompt[i]) + max(len(pairs.chosen[i]), len(pairs.rejected[i])) for i in indices
    )
    t = bucket_for(longest, buckets)
    shape = (len(indices), 2, t)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    attention_mask = np.zeros(shape, dtype=np.int32)
    loss_mask = np.zeros(shape, dtype=np.int32)
    for b, i in enumerate(indices):
        prompt = pairs.prompt[i]
        for side, response in enumerate((pairs.chosen[i], pairs.rejected[i])):
            n, end = len(prompt), len(prompt) + len(response)
            input_ids[b, side, :n] = prompt
            input_ids[b, side, n:end] = response
            attention_mask[b, side, :end] = 1
            loss_mask[b, side, n:end] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "index": indices,
    }


def with_ref_logps(batch: dict[str, np.ndarray], ref_logps: np.ndarray) -> dict[str, np.ndarray]:
    """``batch`` plus ``ref_logps`` float32 [B, 2] (chosen, rejected), looked up by index.

    ``ref_logps`` is the table [N, 2] of reference-model sequence log-probs of every pair
    of the dataset the batch was drawn from (computed once, before training).
    """
    table = np.asarray(ref_logps, dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 2:
        raise ValueError(f"ref_logps must have shape [N, 2], got {table.shape}")
    index = batch["index"]
    if index.size and index.max() >= table.shape[0]:
        raise ValueError(
            f"ref_logps has {table.shape[0]} rows but the batch uses pair {int(index.max())}"
        )
    rows = table[index]
    if not np.all(np.isfinite(rows)):
        bad = int(index[~np.all(np.isfinite(rows), axis=1)][0])
        raise ValueError(f"ref_logps row {bad} is not finite: {table[bad].tolist()}")
    return {**batch, "ref_logps": rows}
