"""Buckets, batch layout and masks, seeded shuffling, resumability, splits, ref log-probs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.data import (
    PairLoader,
    PreferenceRecord,
    TokenizeConfig,
    TokenizedPairs,
    bucket_for,
    bucket_lengths,
    collate,
    read_records,
    split_indices,
    tokenize_records,
    with_ref_logps,
)

WORDS = "the cat is and a of to bread you say".split()
MAX_LEN = 64


@pytest.fixture(scope="module")
def data(tokenizer, special_ids):
    """41 records of varied lengths, tokenised with BOS and EOS."""
    rng = np.random.default_rng(0)
    text = lambda n: " " + " ".join(rng.choice(WORDS, size=n))
    records = [
        PreferenceRecord(f"Q{i}:" + text(rng.integers(1, 6)), text(rng.integers(1, 12)),
                         text(rng.integers(1, 12)), f"mem:line {i + 1}")
        for i in range(41)
    ]
    config = TokenizeConfig(MAX_LEN, 32, eos_id=special_ids["eos"], bos_id=special_ids["bos"],
                            pad_id=special_ids["pad"])
    pairs, report = tokenize_records(records, tokenizer, config)
    assert report.kept == 41 and report.truncated == 0
    return records, pairs, config


def _loader(data, **kw):
    _, pairs, config = data
    kw = {"buckets": bucket_lengths(MAX_LEN, smallest=8), "pad_id": config.pad, "seed": 3, **kw}
    return PairLoader(pairs, 4, **kw)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bucket_lengths():
    assert bucket_lengths(100) == (16, 32, 64, 100)
    assert bucket_lengths(64) == (16, 32, 64)
    assert bucket_lengths(200, multiple_of=64) == (64, 128, 192, 200)
    assert bucket_lengths(10, smallest=16) == (10,)
    assert [bucket_for(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        bucket_for(65, (16, 32, 64))


def test_batch_layout_masks_and_alignment(data, tokenizer, special_ids):
    records, pairs, config = data
    loader = _loader(data)
    buckets = set(bucket_lengths(MAX_LEN, smallest=8))
    for step in range(2 * len(loader)):
        batch = loader.batch(step)
        ids, attn, loss = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        b, two, t = ids.shape
        assert (b, two) == (4, 2) and t in buckets
        assert t == bucket_for(int(pairs.lengths[batch["index"]].max()), sorted(buckets))
        for name in ("input_ids", "attention_mask", "loss_mask"):
            assert batch[name].dtype == np.int32 and batch[name].shape == (b, 2, t)
        assert np.all(ids[attn == 0] == config.pad)
        assert np.all(loss <= attn)
        for row, i in enumerate(batch["index"]):
            record = records[i]
            for side, response in enumerate((record.chosen, record.rejected)):
                real = ids[row, side][attn[row, side] == 1].tolist()
                # Right padding: the real tokens are a prefix.
                assert attn[row, side, : len(real)].all()
                assert real[0] == special_ids["bos"]
                assert tokenizer.decode(real[1:]) == record.prompt + response
                scored = ids[row, side][loss[row, side] == 1].tolist()
                assert scored[-1] == special_ids["eos"]
                assert tokenizer.decode(scored[:-1]) == response
                # The mask is one contiguous run ending at the last real token.
                run = np.flatnonzero(loss[row, side])
                assert run[-1] == len(real) - 1 and np.all(np.diff(run) == 1)
            assert np.array_equal(ids[row, 0, : len(pairs.prompt[i])], ids[row, 1, : len(pairs.prompt[i])])


def test_collate_pads_to_the_smallest_bucket(data):
    _, pairs, config = data
    short = int(np.argmin(pairs.lengths))
    batch = collate(pairs, [short], (8, 16, 32, 64), config.pad)
    assert batch["input_ids"].shape[-1] == bucket_for(int(pairs.lengths[short]), (8, 16, 32, 64))


def test_batch_k_is_a_pure_function_of_seed_and_k(data):
    run = list(_loader(data).iter_batches(0, num_steps=3 * 10))
    assert len(_loader(data)) == 10 and _loader(data).remainder == 1
    for k in (0, 7, 10, 23, 29):  # inside and across epoch boundaries
        assert _same(_loader(data).batch(k), run[k])
    resumed = list(_loader(data).iter_batches(start_step=17, num_steps=5))
    assert all(_same(a, b) for a, b in zip(resumed, run[17:22]))
    other_seed = [_loader(data, seed=4).batch(k) for k in range(10)]
    assert any(not _same(a, b) for a, b in zip(other_seed, run[:10]))


def test_each_epoch_is_a_fresh_permutation(data):
    loader = _loader(data)
    seen = []
    for epoch in range(3):
        idx = np.concatenate([loader.batch(epoch * len(loader) + j)["index"]
                              for j in range(len(loader))])
        assert len(set(idx.tolist())) == len(idx) == 40  # no repeats; one pair is the remainder
        seen.append(idx)
    assert not np.array_equal(seen[0], seen[1])


def test_batches_group_similar_lengths(data):
    _, pairs, _ = data
    loader = _loader(data, sort_window=10)  # one window = the whole epoch
    spans = sorted((pairs.lengths[loader.batch(j)["index"]].min(),
                    pairs.lengths[loader.batch(j)["index"]].max()) for j in range(len(loader)))
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert hi <= lo


def test_unshuffled_loader_keeps_order_and_every_pair(data):
    loader = _loader(data, shuffle=False, drop_last=False)
    assert len(loader) == 11 and loader.remainder == 0
    idx = [loader.batch(j)["index"] for j in range(len(loader))]
    assert np.array_equal(np.concatenate(idx), np.arange(41)) and len(idx[-1]) == 1


def test_loader_rejects_no_pairs(data):
    _, pairs, _ = data
    for shuffle in (True, False):
        with pytest.raises(ValueError, match="no pairs to load"):
            PairLoader(pairs.take([]), 4, buckets=(MAX_LEN,), pad_id=0, shuffle=shuffle,
                       drop_last=shuffle)


def test_loader_rejects_pairs_longer_than_the_largest_bucket(data):
    with pytest.raises(ValueError, match=r"mem:line \d+: pair of \d+ tokens exceeds the largest bucket 8"):
        _loader(data, buckets=(8,))
    with pytest.raises(ValueError, match="shuffle=True needs drop_last=True"):
        _loader(data, drop_last=False)


def test_split_indices():
    train, held = split_indices(50, 0.2, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(50))
    again, held_again = split_indices(50, 0.2, seed=1)
    assert np.array_equal(held, held_again) and np.array_equal(train, again)
    assert not np.array_equal(held, split_indices(50, 0.2, seed=2)[1])
    assert len(split_indices(50, 7, seed=1)[1]) == 7
    with pytest.raises(ValueError, match="empty split"):
        split_indices(5, 0.01, seed=0)


def test_split_indices_keeps_each_group_on_one_side():
    groups = [i // 3 for i in range(30)]  # ten prompts, three pairs each
    train, held = split_indices(30, 7, seed=4, groups=groups)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(30))
    held_groups, train_groups = {groups[i] for i in held}, {groups[i] for i in train}
    assert not held_groups & train_groups
    assert len(held) == 9  # whole groups reaching 7: three of three
    assert np.array_equal(held, split_indices(30, 7, seed=4, groups=groups)[1])
    assert any(not np.array_equal(held, split_indices(30, 7, seed=s, groups=groups)[1])
               for s in range(5, 9))
    assert np.array_equal(split_indices(30, 7, seed=4, groups=range(30))[1],
                          split_indices(30, 7, seed=4, groups=list(range(30)))[1])
    with pytest.raises(ValueError, match=r"in 1 groups \(prompts\) leaves an empty split"):
        split_indices(4, 1, seed=0, groups=["same"] * 4)
    with pytest.raises(ValueError, match="3 keys for 4 items"):
        split_indices(4, 1, seed=0, groups=[1, 2, 3])


def test_split_then_load(data):
    _, pairs, config = data
    train, held = split_indices(len(pairs), 9, seed=0)
    held_pairs = pairs.take(held)
    assert held_pairs.source == [pairs.source[i] for i in held]
    loader = PairLoader(held_pairs, 3, buckets=(MAX_LEN,), pad_id=config.pad, shuffle=False)
    assert len(loader) == 3


def test_with_ref_logps_looks_rows_up_by_pair_index(data):
    batch = _loader(data).batch(5)
    table = np.stack([np.arange(41.0), -np.arange(41.0)], axis=1)
    out = with_ref_logps(batch, table)
    assert out["ref_logps"].dtype == np.float32 and out["ref_logps"].shape == (4, 2)
    assert np.array_equal(out["ref_logps"][:, 0], batch["index"])
    assert "ref_logps" not in batch
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        with_ref_logps(batch, table[:, 0])
    with pytest.raises(ValueError, match="ref_logps has 3 rows"):
        with_ref_logps(batch, table[:3])
    table[batch["index"][1], 1] = np.nan
    with pytest.raises(ValueError, match=f"ref_logps row {batch['index'][1]} is not finite"):
        with_ref_logps(batch, table)


def test_end_to_end_from_a_fixture_file(fixtures_dir, tokenizer, special_ids):
    records, report = read_records(fixtures_dir / "webgpt.jsonl")
    config = TokenizeConfig(128, 64, eos_id=special_ids["eos"])
    pairs, report = tokenize_records(records, tokenizer, config, report=report)
    assert report.summary() == "kept 3 records; dropped 1 (tie=1)"
    batch = PairLoader(pairs, 2, buckets=bucket_lengths(128), pad_id=config.pad).batch(0)
    assert batch["input_ids"].shape[:2] == (2, 2)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
                min_size=1, max_size=5))
def test_collate_masks_count_exactly_the_tokens(sizes):
    """Masks from the ragged lengths alone: attention = prompt + response, loss = response."""
    make = lambda n, base: np.arange(base, base + n, dtype=np.int32)
    pairs = TokenizedPairs([make(p, 100) for p, _, _ in sizes], [make(c, 200) for _, c, _ in sizes],
                           [make(r, 300) for _, _, r in sizes], ["mem"] * len(sizes))
    batch = collate(pairs, range(len(sizes)), bucket_lengths(32, smallest=4), pad_id=0)
    for row, (p, c, r) in enumerate(sizes):
        for side, n in enumerate((c, r)):
            assert batch["attention_mask"][row, side].tolist() == [1] * (p + n) + [0] * (
                batch["input_ids"].shape[-1] - p - n)
            assert batch["loss_mask"][row, side].sum() == n
            assert np.all(batch["input_ids"][row, side][batch["loss_mask"][row, side] == 1]
                          == 200 + 100 * side + np.arange(n))
