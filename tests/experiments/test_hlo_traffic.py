"""experiments.hlo_traffic: kernels and bytes of an HLO module, by hand and from XLA."""

import jax
import jax.numpy as jnp
import pytest

from experiments import hlo_traffic

# A module as XLA:GPU prints one after its optimizations: a multi-output fusion whose
# results are read by index (#i), a library call, a conditional whose branches launch
# kernels of their own, and instructions that launch nothing.
MODULE = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8]{0}}

%fused_pair (p: f32[8,4]) -> (f32[8], bf16[8,4]) {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %t = (f32[8]{0}, bf16[8,4]{1,0}) tuple(%p, %p)
}

%branch_true (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %neg_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_neg
}

%branch_false (b: f32[8]) -> f32[8] {
  ROOT %b = f32[8]{0} parameter(0)
}

ENTRY %main.1 (x: f32[8,4], flag: pred[]) -> f32[8] {
  %x = f32[8,4]{1,0} parameter(0)
  %flag = pred[] parameter(1)
  %pair_fusion.3 = (f32[8]{0}, /*index=1*/bf16[8,4]{1,0}) fusion(%x), kind=kInput, calls=%fused_pair, metadata={op_name="jit(step)/Decoder/layers_3/mlp/reduce_sum"}
  %gemm.1 = f32[8,8]{1,0} custom-call(%pair_fusion.3#1, %pair_fusion.3#1), custom_call_target="__cublas$gemm"
  %seen = f32[8,8]{1,0} bitcast(%gemm.1)
  %cond.2 = f32[8]{0} conditional(%flag, %pair_fusion.3#0, %pair_fusion.3#0), true_computation=%branch_true, false_computation=%branch_false
  ROOT %copy.4 = f32[8]{0} copy(%cond.2)
}
"""


def test_kernels_and_their_bytes_by_hand():
    found = hlo_traffic.kernels(MODULE)
    assert [(k.name, k.opcode, k.computation) for k in found] == [
        ("pair_fusion.3", "fusion", "main.1"), ("gemm.1", "custom-call", "main.1"),
        ("neg_fusion", "fusion", "branch_true"), ("copy.4", "copy", "main.1")]
    by_name = {k.name: k for k in found}
    assert (by_name["pair_fusion.3"].bytes_read, by_name["pair_fusion.3"].bytes_written) == (
        8 * 4 * 4, 8 * 4 + 8 * 4 * 2)
    # Each operand by its element of the tuple: bf16[8,4] twice.
    assert (by_name["gemm.1"].bytes_read, by_name["gemm.1"].bytes_written) == (2 * 64, 256)
    assert (by_name["neg_fusion"].bytes_read, by_name["copy.4"].bytes_read) == (32, 32)
    assert by_name["pair_fusion.3"].op_name == "jit(step)/Decoder/layers_3/mlp/reduce_sum"
    assert hlo_traffic.summary(found) == {"kernels": 4, "bytes": 128 + 96 + 128 + 256 + 64 + 64}
    assert hlo_traffic.by_source(found)[0] == ("gemm | ", 1, 128.0, 256.0)  # most bytes first
    assert ("pair_fusion | jit(step)/Decoder/layers_*/mlp/reduce_sum", 1, 128.0, 96.0) in \
        hlo_traffic.by_source(found)


def test_a_text_without_an_entry_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_traffic.kernels("HloModule empty\n")


def test_counts_what_xla_compiled(tmp_path):
    """A jitted function's compiled HLO: at least one kernel, and its bytes cover the
    output it must write."""
    compiled = jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0).lower(jnp.ones((64, 32))).compile()
    total = hlo_traffic.summary(hlo_traffic.kernels(compiled.as_text()))
    assert total["kernels"] >= 1 and total["bytes"] >= 64 * 64 * 4


def test_cli_prints_the_groups_and_names_a_bad_file(tmp_path, capsys):
    path = tmp_path / "module.txt"
    path.write_text(MODULE)
    hlo_traffic.main([str(path), "--match", "layers_"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 kernels, 0.00 GB read and written"
    assert len(out) == 2 and "layers_*/mlp/reduce_sum" in out[1]
    with pytest.raises(SystemExit) as exc:
        hlo_traffic.main([str(tmp_path / "missing.txt")])
    assert exc.value.code == 2 and "missing.txt" in capsys.readouterr().err
