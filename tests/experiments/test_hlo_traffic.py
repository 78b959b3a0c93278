"""experiments.hlo_traffic: kernels and bytes of an HLO module, by hand and from XLA."""

import gzip

import jax
import jax.numpy as jnp
import pytest

from experiments import hlo_traffic

# A module as XLA:GPU prints one after its optimizations: a multi-output fusion whose
# results are read by index (#i), a library call, a conditional whose branches launch
# kernels of their own, a loop of known trip count, an asynchronous pair, a reduction whose
# scalar to_apply is part of its kernel, and instructions that launch nothing.
MODULE = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8]{0}}

%fused_pair (p: f32[8,4]) -> (f32[8], bf16[8,4]) {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %t = (f32[8]{0}, bf16[8,4]{1,0}) tuple(%p, %p)
}

%add (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %sum = f32[] add(%l, %r)
}

%branch_true (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %neg_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_neg
}

%branch_false (b: f32[8]) -> f32[8] {
  ROOT %b = f32[8]{0} parameter(0)
}

%branch_other (c: f32[8]) -> f32[8] {
  %c = f32[8]{0} parameter(0)
  ROOT %exp_fusion = f32[8]{0} fusion(%c), kind=kLoop, calls=%fused_exp
}

%body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  ROOT %step_fusion = (s32[], f32[8]{0}) fusion(%s), kind=kLoop, calls=%fused_step
}

%condition (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt_fusion = pred[] fusion(%s), kind=kLoop, calls=%fused_lt
}

ENTRY %main.1 (x: f32[8,4], flag: pred[], pick: s32[]) -> f32[8] {
  %x = f32[8,4]{1,0} parameter(0)
  %flag = pred[] parameter(1)
  %pick = s32[] parameter(2)
  %zero = f32[] constant(0)
  %pair_fusion.3 = (f32[8]{0}, /*index=1*/bf16[8,4]{1,0}) fusion(%x), kind=kInput, calls=%fused_pair, metadata={op_name="jit(step)/Decoder/layers_3/mlp/reduce_sum"}
  %gemm.1 = f32[8,8]{1,0} custom-call(%pair_fusion.3#1, %pair_fusion.3#1), custom_call_target="__cublas$gemm"
  %seen = f32[8,8]{1,0} bitcast(%gemm.1)
  %rows.5 = f32[8]{0} reduce(%seen, %zero), dimensions={1}, to_apply=%add
  %cond.2 = f32[8]{0} conditional(%flag, %pair_fusion.3#0, %pair_fusion.3#0), true_computation=%branch_true, false_computation=%branch_false
  %case.6 = f32[8]{0} conditional(%pick, %cond.2, %cond.2), branch_computations={%branch_false, %branch_other}
  %init = (s32[], f32[8]{0}) tuple(%pick, %case.6)
  %loop.7 = (s32[], f32[8]{0}) while(%init), condition=%condition, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %start.8 = ((f32[8]{0}), f32[8]{0}, s32[]) async-start(%loop.7#1), calls=%wrapped_copy
  %done.8 = f32[8]{0} async-done(%start.8)
  ROOT %copy.4 = f32[8]{0} copy(%done.8)
}
"""


def test_kernels_and_their_bytes_by_hand():
    found, unknown = hlo_traffic.kernels(MODULE)
    assert unknown == 0
    assert [(k.name, k.opcode, k.computation, k.runs) for k in found] == [
        ("pair_fusion.3", "fusion", "main.1", 1), ("gemm.1", "custom-call", "main.1", 1),
        ("rows.5", "reduce", "main.1", 1), ("neg_fusion", "fusion", "branch_true", 1),
        ("exp_fusion", "fusion", "branch_other", 1),
        ("step_fusion", "fusion", "body", 3), ("lt_fusion", "fusion", "condition", 4),
        ("start.8", "async-start", "main.1", 1), ("copy.4", "copy", "main.1", 1)]
    by_name = {k.name: k for k in found}
    assert (by_name["pair_fusion.3"].bytes_read, by_name["pair_fusion.3"].bytes_written) == (
        8 * 4 * 4, 8 * 4 + 8 * 4 * 2)
    # Each operand by its element of the tuple: bf16[8,4] twice.
    assert (by_name["gemm.1"].bytes_read, by_name["gemm.1"].bytes_written) == (2 * 64, 256)
    assert (by_name["rows.5"].bytes_read, by_name["rows.5"].bytes_written) == (256 + 4, 32)
    assert (by_name["step_fusion"].bytes_read, by_name["step_fusion"].bytes_written) == (36, 36)
    # An async-start writes its result, element 1 of (operands, result, context).
    assert (by_name["start.8"].bytes_read, by_name["start.8"].bytes_written) == (32, 32)
    assert by_name["pair_fusion.3"].op_name == "jit(step)/Decoder/layers_3/mlp/reduce_sum"
    assert hlo_traffic.summary(MODULE) == {
        "kernels": 5 + 2 + 3 + 4, "unknown_trip_counts": 0,
        "bytes": 224 + 384 + 292 + 64 + 64 + 4 * (36 + 1) + 3 * 72 + 64 + 64}
    assert hlo_traffic.by_source(found)[0] == ("gemm | ", 1, 128.0, 256.0)  # most bytes first
    assert ("pair_fusion | jit(step)/Decoder/layers_*/mlp/reduce_sum", 1, 128.0, 96.0) in \
        hlo_traffic.by_source(found)
    assert ("step_fusion | ", 3, 108.0, 108.0) in hlo_traffic.by_source(found)


# Fusions that read part of an operand: a gather of a row from a bitcast parameter beside a
# whole read, a scatter of one row and a dynamic update slice, each into its destination
# in place.
PARTIAL = """HloModule jit_step, entry_computation_layout={(f32[64,8]{1,0})->f32[64,8]{0}}

%fused_gather (p0: f32[64,8], p1: s32[1,1], p2: f32[8]) -> f32[1,8] {
  %p0 = f32[64,8]{1,0} parameter(0)
  %flat = f32[512]{0} bitcast(%p0)
  %again = f32[64,8]{1,0} bitcast(%flat)
  %p1 = s32[1,1]{1,0} parameter(1)
  %row = f32[1,8]{1,0} gather(%again, %p1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}
  %p2 = f32[8]{0} parameter(2)
  %whole = f32[1,8]{1,0} bitcast(%p2)
  ROOT %sum = f32[1,8]{1,0} add(%row, %whole)
}

%fused_scatter (q0: f32[64,8], q1: s32[1,1], q2: f32[1,8]) -> f32[64,8] {
  %q0 = f32[64,8]{1,0} parameter(0)
  %q1 = s32[1,1]{1,0} parameter(1)
  %q2 = f32[1,8]{1,0} parameter(2)
  ROOT %put = f32[64,8]{1,0} scatter(%q0, %q1, %q2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
}

%fused_update (u0: f32[64,8], u1: f32[1,8], u2: s32[]) -> f32[512] {
  %u0 = f32[64,8]{1,0} parameter(0)
  %u1 = f32[1,8]{1,0} parameter(1)
  %u2 = s32[] parameter(2)
  %into = f32[64,8]{1,0} dynamic-update-slice(%u0, %u1, %u2, %u2)
  ROOT %flat = f32[512]{0} bitcast(%into)
}

%fused_copy (c0: f32[64,8]) -> f32[512] {
  %c0 = f32[64,8]{1,0} parameter(0)
  ROOT %flat = f32[512]{0} reshape(%c0)
}

%fused_not_root (n0: f32[64,8], n1: s32[1,1], n2: f32[1,8]) -> f32[64,8] {
  %n0 = f32[64,8]{1,0} parameter(0)
  %n1 = s32[1,1]{1,0} parameter(1)
  %n2 = f32[1,8]{1,0} parameter(2)
  %put = f32[64,8]{1,0} scatter(%n0, %n1, %n2), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add
  ROOT %neg = f32[64,8]{1,0} negate(%put)
}

%fused_pair_scatter (s0: f32[64,8], s1: f32[64,8], s2: s32[1,1], s3: f32[1,8], s4: f32[1,8]) -> (f32[64,8], f32[64,8]) {
  %s0 = f32[64,8]{1,0} parameter(0)
  %s1 = f32[64,8]{1,0} parameter(1)
  %s2 = s32[1,1]{1,0} parameter(2)
  %s3 = f32[1,8]{1,0} parameter(3)
  %s4 = f32[1,8]{1,0} parameter(4)
  ROOT %both = (f32[64,8]{1,0}, f32[64,8]{1,0}) scatter(%s0, %s1, %s2, %s3, %s4), update_window_dims={1}, inserted_window_dims={0}, scatter_dims_to_operand_dims={0}, index_vector_dim=1, to_apply=%add2
}

%fused_read (r0: f32[64,8], r1: s32[1,1]) -> f32[64,8] {
  %r0 = f32[64,8]{1,0} parameter(0)
  %r1 = s32[1,1]{1,0} parameter(1)
  %part = f32[1,8]{1,0} gather(%r0, %r1), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}
  ROOT %neg = f32[64,8]{1,0} negate(%r0)
}

%add (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %s = f32[] add(%l, %r)
}

%add2 (a0: f32[], a1: f32[], b0: f32[], b1: f32[]) -> (f32[], f32[]) {
  %a0 = f32[] parameter(0)
  %a1 = f32[] parameter(1)
  %b0 = f32[] parameter(2)
  %b1 = f32[] parameter(3)
  %sum0 = f32[] add(%a0, %b0)
  %sum1 = f32[] add(%a1, %b1)
  ROOT %sums = (f32[], f32[]) tuple(%sum0, %sum1)
}

ENTRY %main.1 (x: f32[64,8], i: s32[1,1], v: f32[8]) -> f32[512] {
  %x = f32[64,8]{1,0} parameter(0)
  %i = s32[1,1]{1,0} parameter(1)
  %v = f32[8]{0} parameter(2)
  %gathered = f32[1,8]{1,0} fusion(%x, %i, %v), kind=kLoop, calls=%fused_gather
  %negated = f32[64,8]{1,0} fusion(%x, %i), kind=kLoop, calls=%fused_read
  %updated = f32[64,8]{1,0} fusion(%negated, %i, %gathered), kind=kInput, calls=%fused_scatter
  %k = s32[] constant(3)
  %placed = f32[512]{0} fusion(%updated, %gathered, %k), kind=kLoop, calls=%fused_update
  %copied = f32[512]{0} fusion(%x), kind=kLoop, calls=%fused_copy
  %kept = f32[64,8]{1,0} fusion(%x, %i, %gathered), kind=kLoop, calls=%fused_not_root
  %pair = (f32[64,8]{1,0}, f32[64,8]{1,0}) fusion(%x, %kept, %i, %gathered, %gathered), kind=kInput, calls=%fused_pair_scatter
  ROOT %out = f32[512]{0} add(%placed, %copied)
}
"""


def test_fused_gathers_and_in_place_scatters_count_what_they_touch():
    """A parameter only gathered from (through bitcasts) costs the rows gathered; the
    destination of the root's scatter or dynamic update slice costs the rows updated, and
    the fusion writes those alone; a parameter also read whole costs its whole."""
    by_name = {k.name: (k.bytes_read, k.bytes_written) for k in hlo_traffic.kernels(PARTIAL)[0]}
    assert by_name["gathered"] == (32 + 4 + 32, 32)
    assert by_name["negated"] == (64 * 8 * 4 + 4, 64 * 8 * 4)
    # A scatter reads the rows it updates (its combiner may add to them) and writes them.
    assert by_name["updated"] == (32 + 4 + 32, 32)
    # Under a bitcast root, a dynamic update slice writes its update alone, reading nothing.
    assert by_name["placed"] == (0 + 32 + 4, 32)
    # Read whole: a parameter only reshaped into the output, a scatter that is not the
    # root (its result is read again); a scatter of two operands updates both.
    assert by_name["copied"] == (64 * 8 * 4, 64 * 8 * 4)
    assert by_name["kept"] == (64 * 8 * 4 + 4 + 32, 64 * 8 * 4)
    assert by_name["pair"] == (2 * 32 + 4 + 2 * 32, 2 * 32)


def test_a_loop_of_unknown_trip_count_is_counted_once_and_said():
    text = MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    found, unknown = hlo_traffic.kernels(text)
    assert unknown == 1
    assert {k.name: k.runs for k in found}["step_fusion"] == 1
    assert hlo_traffic.summary(text)["unknown_trip_counts"] == 1


def test_a_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_traffic.kernels("HloModule empty\n")


def test_counts_what_xla_compiled(tmp_path):
    """A jitted function's compiled HLO: at least one kernel, and its bytes cover the
    output it must write."""
    compiled = jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0).lower(jnp.ones((64, 32))).compile()
    total = hlo_traffic.summary(compiled.as_text())
    assert total["kernels"] >= 1 and total["bytes"] >= 64 * 64 * 4

    def loop(x):
        return jax.lax.fori_loop(0, 10, lambda i, y: jnp.tanh(y @ y), x)

    looped = hlo_traffic.summary(jax.jit(loop).lower(jnp.ones((32, 32))).compile().as_text())
    once = hlo_traffic.summary(jax.jit(lambda y: jnp.tanh(y @ y)).lower(
        jnp.ones((32, 32))).compile().as_text())
    # The loop's body runs ten times: at least ten times the body's matmul and its bytes.
    assert looped["unknown_trip_counts"] == 0
    assert looped["kernels"] >= 10 * once["kernels"] and looped["bytes"] >= 10 * once["bytes"]


def test_cli_prints_the_groups_and_names_a_bad_file(tmp_path, capsys):
    path = tmp_path / "module.txt"
    path.write_text(MODULE)
    hlo_traffic.main([str(path), "--match", "layers_"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "14 kernels, 0.00 GB read and written"
    assert len(out) == 2 and "layers_*/mlp/reduce_sum" in out[1]
    with pytest.raises(SystemExit) as exc:
        hlo_traffic.main([str(tmp_path / "missing.txt")])
    assert exc.value.code == 2 and "missing.txt" in capsys.readouterr().err


def test_cli_reads_a_gzipped_dump(tmp_path, capsys):
    path = tmp_path / "module.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(MODULE)
    hlo_traffic.main([str(path), "--match", "layers_"])
    assert capsys.readouterr().out.splitlines()[0] == "14 kernels, 0.00 GB read and written"
    path.write_bytes(gzip.compress(MODULE.encode())[:40])
    with pytest.raises(SystemExit) as exc:
        hlo_traffic.main([str(path)])
    assert exc.value.code == 2 and "module.txt.gz" in capsys.readouterr().err
