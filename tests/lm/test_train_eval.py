"""Held-out eval of ``lm.train.train``: batches of any size, metrics as means over their rows."""

import jax
import numpy as np
import optax
import pytest

from lm.train import TrainConfig, train
from lm.train.logging import read_jsonl
from lm.train.loop import eval_from_grad_fn, eval_means
from train_mlp import grad_fn, init_params, make_batch_at

TX = optax.adamw(1e-2)


def held_out(*sizes):
    """Eval batches of these row counts."""
    return [make_batch_at(1, rows, set())(i) for i, rows in enumerate(sizes)]


def test_eval_metrics_are_means_over_the_rows_of_batches_of_any_size(tmp_path):
    """Batches of 8, 8 and 3 rows: the logged metrics are those of the 19 rows evaluated one
    by one and averaged, not the mean of the three batch means."""
    batches = held_out(8, 8, 3)
    config = TrainConfig(steps=2, batch_size=8, log_every=2, progress=False, plots=False)
    result = train(grad_fn, TX, init_params(0), make_batch_at(0, 8, set()), config, str(tmp_path),
                   eval_batches=lambda: batches)
    (row,) = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "eval"]

    eval_fn, params = jax.jit(eval_from_grad_fn(grad_fn)), jax.device_get(result.state.params)
    alone = [jax.device_get(eval_fn(params, {k: v[i:i + 1] for k, v in batch.items()}, None))
             for batch in batches for i in range(len(batch["x"]))]
    assert len(alone) == 19
    assert row["loss"] == pytest.approx(np.mean([loss for loss, _ in alone]), rel=1e-6)
    accuracy = np.mean([metrics["rewards/accuracies"] for _, metrics in alone])
    assert row["rewards/accuracies"] == pytest.approx(accuracy, rel=1e-6)


def test_eval_means_weigh_each_batch_by_its_rows():
    # Magnitudes so far apart that their float64 sums round (3 x each value would sum to
    # another last bit).
    values = np.array([-0.0774798542, 0.0051293429, -0.172982618, 1.36781092e-12, 2.01926966e-07], np.float32)
    metrics_of = lambda batch: {"m": batch["m"][0, 0]}  # a batch's metric: a value of its rows
    sized = lambda sizes: [{"m": np.full((n, 2), v)} for n, v in zip(sizes, values)]

    got = eval_means(metrics_of, sized([4, 4, 4, 4, 2]))["m"]
    assert got == pytest.approx(np.average(values, weights=[4, 4, 4, 4, 2]), rel=1e-12)
    # Batches of one size: the plain mean of the batch means, bit for bit (as before batches
    # were weighted), whatever the size.
    for size in (3, 4):
        plain = 0.0
        for v in values:
            plain += float(v)
        assert eval_means(metrics_of, sized([size] * 5))["m"] == plain / 5
    assert eval_means(metrics_of, []) == {}


def test_an_empty_eval_batch_is_refused():
    with pytest.raises(ValueError, match="an eval batch has no rows"):
        eval_means(lambda batch: {"m": 0.0}, [{"x": np.zeros((0, 2))}])
