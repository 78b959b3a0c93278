"""Mesh flags, the FSDP sharding rule and batch-size checks (pure functions, no devices)."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm.train.mesh import ConfigError, check_batch_size, fsdp_spec, parse_mesh, rows_in


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        (None, 8, {"data": 8, "fsdp": 1}),
        ("data=2,fsdp=4", 8, {"data": 2, "fsdp": 4}),
        ("fsdp=4", 8, {"data": 2, "fsdp": 4}),
        ("data=8", 8, {"data": 8, "fsdp": 1}),
        ("data=-1,fsdp=2", 8, {"data": 4, "fsdp": 2}),
        ("fsdp=-1", 8, {"data": 1, "fsdp": 8}),
        (" data = 1 , fsdp = 1 ", 1, {"data": 1, "fsdp": 1}),
    ],
)
def test_parse_mesh(spec, n, expected):
    assert parse_mesh(spec, n) == expected


@pytest.mark.parametrize(
    "spec, n, message",
    [
        ("data=3,fsdp=2", 8, "data=3 x fsdp=2 = 6 devices, but 8 are available"),
        ("data=2", 8, "data=2 x fsdp=1 = 2 devices, but 8 are available"),
        ("fsdp=3", 8, "8 devices are not divisible by 3"),
        ("tensor=2", 8, "got 'tensor=2'"),
        ("data=2,data=4", 8, "got 'data=4'"),
        ("data=two", 8, "size of 'data' is not an integer: 'two'"),
        ("data=0", 8, "must be positive or -1"),
        ("data=-1,fsdp=-1", 8, "at most one axis may be -1"),
    ],
)
def test_parse_mesh_rejects(spec, n, message):
    with pytest.raises(ConfigError, match="--mesh") as err:
        parse_mesh(spec, n)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "shape, fsdp, spec",
    [
        ((16,), 4, P()),  # 1-D: replicated
        ((8, 16), 4, P(None, "fsdp")),  # largest divisible dim
        ((16, 8), 4, P("fsdp", None)),
        ((12, 6), 4, P("fsdp", None)),
        ((10, 6), 4, P()),  # nothing divisible: replicated
        ((16, 16), 4, P("fsdp", None)),  # tie: first dim
        ((3, 5, 8), 2, P(None, None, "fsdp")),
        ((8, 16), 1, P()),
    ],
)
def test_fsdp_spec(shape, fsdp, spec):
    assert fsdp_spec(shape, fsdp) == spec


def test_fsdp_spec_prefers_divisible_over_larger():
    assert fsdp_spec((30, 8), 4) == P(None, "fsdp")


def test_batch_size_divisible_by_all_shards():
    check_batch_size(16, {"data": 2, "fsdp": 4})
    with pytest.raises(ConfigError) as err:
        check_batch_size(6, {"data": 2, "fsdp": 4})
    assert str(err.value) == "--batch-size 6 is not divisible by the 8 batch shards of the mesh (data=2 x fsdp=4)"
    with pytest.raises(ConfigError):
        check_batch_size(0, {"data": 1, "fsdp": 1})


def test_each_micro_batch_divisible_by_all_shards():
    """With --grad-accum every micro-batch is spread over the devices: the message names
    both flags and the micro-batch size (not "--batch-size 1" for a batch of 2 in 2)."""
    check_batch_size(16, {"data": 2, "fsdp": 4}, grad_accum=2)
    with pytest.raises(ConfigError) as err:
        check_batch_size(8, {"data": 2, "fsdp": 2}, grad_accum=4)
    assert str(err.value) == ("--batch-size 8 / --grad-accum 4 = 2 pairs per micro-batch, not divisible by "
                              "the 4 batch shards of the mesh (data=2 x fsdp=2)")
    with pytest.raises(ConfigError, match=r"^--batch-size 8 is not divisible by --grad-accum 3$"):
        check_batch_size(8, {"data": 1, "fsdp": 1}, grad_accum=3)


def test_rows_are_the_leading_dimension_every_array_shares():
    assert rows_in({"input_ids": np.zeros((3, 2, 5)), "index": np.zeros(3)}) == 3
    with pytest.raises(ValueError, match=r"must share a leading \(row\) dimension; got shapes \[\(3, 2\), \(4,\)\]"):
        rows_in({"a": np.zeros((3, 2)), "b": np.zeros(4)})
    with pytest.raises(ValueError, match=r"got shapes \[\(\)\]"):
        rows_in({"scalar": np.float32(1.0)})
