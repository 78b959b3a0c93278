"""experiments.step_profile: op categories from compiled HLO, exclusive times from a trace.

The GPU shapes of both (cuBLAS and cuDNN custom calls, Triton GEMM fusions, a device plane
whose derived lines repeat its stream lines, kernels of a command buffer without their
hlo_op) are written out here, since CI has no GPU;
a real CPU trace is read in tests/experiments/test_bench.py.
"""

import collections
import os
import re
from types import SimpleNamespace

import pytest

from experiments import step_profile as sp

# The module's source tables: frame 2 is lm/models/layers.py:204 in this checkout, frame 3
# a line of flax's, frame 4 one of a file outside both.
SOURCE_TABLES = f"""\
FileNames
1 "{os.getcwd()}/lm/models/layers.py"
2 "/usr/lib/python3/site-packages/flax/linen/linear.py"
3 "/elsewhere/script.py"

FunctionNames
1 "__call__"
2 "<module>"

FileLocations
1 {{file_name_id=1 function_name_id=1 line=204 end_line=204 column=4 end_column=9}}
2 {{file_name_id=2 function_name_id=1 line=7 end_line=7 column=1 end_column=2}}
3 {{file_name_id=3 function_name_id=2 line=3 end_line=3 column=1 end_column=2}}

StackFrames
1 {{file_location_id=3 parent_frame_id=1}}
2 {{file_location_id=1 parent_frame_id=2}}
3 {{file_location_id=2 parent_frame_id=2}}

"""

GPU_HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

""" + SOURCE_TABLES + """

%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add.1 = f32[8]{0} add(%p0, %p0)
}

%fused_dot (p0: bf16[8,8], p1: bf16[8,8]) -> f32[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.5 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %loop_fusion.2 = (s32[], f32[8]{0}) fusion(%t), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/while/body/add" stack_frame_id=2}
}

ENTRY %main.9 (x: f32[8], w: bf16[8,8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %w = bf16[8,8]{1,0} parameter(1)
  %gemm.1 = (bf16[8,8]{1,0}, s8[0]{0}) custom-call(%w, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(Decoder)/layers_0/mlp/fc_in/dot_general" stack_frame_id=2}
  %gemm_fusion.3 = f32[8,8]{1,0} fusion(%w, %w), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.4 = (bf16[1,8,1,8]{3,2,1,0}, u8[0]{0}) custom-call(%w, %w, %w), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp(Decoder)/layers_0/attn/dot_product_attention" source_file="/opt/site-packages/jax/_src/nn/functions.py" source_line=12}
  %loop_fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(Decoder)/final_norm/add"}
  %all-reduce-start = f32[8]{0} all-reduce-start(%x), replica_groups={}
  %copy.7 = f32[8]{0} copy(%x), metadata={op_name="jit(step)/copy" stack_frame_id=3}
  %copy.8 = f32[8]{0} copy(%x), metadata={op_name="jit(step)/copy" stack_frame_id=1}
  %transpose.2 = bf16[8,8]{0,1} transpose(%w), dimensions={1,0}
  %while.3 = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
  %conditional.1 = (f32[8]{0}) conditional(%p, %a, %b), branch_computations={%b0, %b1}
  ROOT %slice.9 = f32[4]{0} slice(%x), slice={[0:4]}
}
"""


def test_hlo_ops_sorts_gpu_instructions_into_categories():
    ops = sp.hlo_ops(GPU_HLO)
    expected = {"gemm.1": "matmul", "gemm_fusion.3": "matmul", "dot.5": "matmul",
                "custom-call.4": "attention", "loop_fusion.1": "fusion",
                "loop_fusion.2": "fusion", "all-reduce-start": "collective",
                "copy.7": "copy", "transpose.2": "copy", "while.3": "control",
                "conditional.1": "control", "slice.9": "other", "add.1": "other"}
    assert {name: ops[name][0] for name in expected} == expected
    assert ops["custom-call.4"].source == "jvp(Decoder)/layers_0/attn/dot_product_attention"
    assert ops["copy.7"].source == "copy" and ops["transpose.2"].source == ""


def test_hlo_ops_name_the_line_of_python_of_each_instruction():
    """The innermost stack frame, from the module's tables: this checkout's files relative
    to it, an installed package's from the package; the older source_file/source_line."""
    ops = sp.hlo_ops(GPU_HLO)
    assert ops["gemm.1"].location == "lm/models/layers.py:204 __call__"
    assert ops["loop_fusion.2"].location == "lm/models/layers.py:204 __call__"
    assert ops["copy.7"].location == "flax/linen/linear.py:7 __call__"
    assert ops["copy.8"].location == "/elsewhere/script.py:3 <module>"
    assert ops["custom-call.4"].location == "jax/_src/nn/functions.py:12"
    assert ops["transpose.2"].location == ""


def _event(name, start, duration, **stats):
    return SimpleNamespace(name=name, start_ns=start, duration_ns=duration,
                           stats=list(stats.items()))


class _Events:
    """A line's events as jaxlib 0.11's ``ProfileData`` holds them: iterable, without ``len``
    (the first profiles on an H200 failed on a ``len``)."""

    def __init__(self, events):
        self._events = list(events)

    def __iter__(self):
        return iter(self._events)


def _profile(*planes):
    return SimpleNamespace(planes=[SimpleNamespace(name=name, lines=[
        SimpleNamespace(name=line, events=_Events(events)) for line, events in lines])
        for name, lines in planes])


def test_gpu_trace_reads_the_stream_lines_once_and_not_the_lines_derived_from_them():
    ops = sp.hlo_ops(GPU_HLO)
    # The derived lines repeat what the stream line holds: read, they would count it twice.
    xla_ops = [_event("%while.3 = (s32[], f32[8]) while(...)", 0, 100),
               _event("loop_fusion.2", 10, 30), _event("gemm.1", 120, 50)]
    stream = [_event("loop_fusion_2", 10, 30, hlo_op="loop_fusion.2"),
              _event("loop_fusion_2", 50, 30, hlo_op="loop_fusion.2"),
              _event("sm90_gemm_kernel", 120, 50, hlo_op="gemm.1"),
              _event("cudnn_kernel", 170, 20, hlo_op="custom-call.4"),
              _event("MemcpyD2H", 100, 5), _event("MemcpyD2H", 190, 5),
              _event("Memcpy HtoD", 0, 5)]
    # The collector's bookkeeping is not the device's time either.
    overhead = [_event("CUPTI overhead", 300, 50)]
    profile = _profile(("/host:CPU", [("python", [_event("gemm.1", 0, 1000)])]),
                       ("/device:GPU:0", [("XLA Modules", [_event("jit_step", 0, 195)]),
                                          ("XLA Ops", xla_ops), ("Steps", [_event("0", 0, 195)]),
                                          ("CUPTI overhead", overhead),
                                          ("Activity buffer", overhead),
                                          ("Stream #7", stream)]))
    summary = sp.summarize(sp.op_events(profile, ops), wall_s=400e-9, steps=2)
    assert summary["ms"] == pytest.approx({"matmul": 25e-6, "attention": 10e-6, "fusion": 30e-6,
                                           "copy": 7.5e-6, "collective": 0.0, "control": 0.0,
                                           "other": 0.0})
    assert summary["busy"] == pytest.approx(145 / 400)
    assert summary["device_to_host"] == 1
    assert summary["memcpy_events"] == {"MemcpyD2H": 1, "Memcpy HtoD": 0.5}
    assert [op["op"] for op in summary["top"][:3]] == ["loop_fusion.2", "gemm.1", "custom-call.4"]
    assert summary["top"][1]["source"] == "jvp(Decoder)/layers_0/mlp/fc_in/dot_general"
    # The loop's fusion and the matmul are one line's: 60 + 50 ns over 2 steps.
    assert summary["by_location"][0] == {"location": "lm/models/layers.py:204 __call__",
                                         "ms": pytest.approx(55e-6)}
    assert {"location": "(copy, no source line)", "ms": pytest.approx(7.5e-6)} in (
        summary["by_location"])


def test_kernels_run_in_a_command_buffer_are_placed_by_their_names():
    """Inside a CUDA graph (XLA:GPU's command buffers) kernels carry no hlo_op: XLA's own
    are named after their fusion, library kernels are sorted by what their names say."""
    ops = sp.hlo_ops(GPU_HLO)
    stream = [_event("loop_fusion_1", 0, 10),
              _event("gemm_fusion_3", 10, 20),
              _event("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 30, 40),
              _event("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN", 70, 40),
              _event("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 110, 30),
              _event("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 140, 10),
              _event("some_library_kernel", 150, 5),
              _event("input_reduce_fusion_7", 155, 5),
              # Charged to the command buffer's call or a loop: each by its own name.
              _event("sm90_xmma_gemm_bf16", 160, 20, hlo_op="command_buffer.2"),
              _event("loop_fusion_1", 180, 10, hlo_op="while.3")]
    profile = _profile(("/device:GPU:0", [("XLA Ops", []), ("Stream #7", stream)]))
    summary = sp.summarize(sp.op_events(profile, ops), wall_s=1e-6, steps=1)
    assert summary["ms"] == pytest.approx({"matmul": 120e-6, "attention": 30e-6,
                                           "fusion": 25e-6, "copy": 0.0, "collective": 10e-6,
                                           "control": 0.0, "other": 5e-6})
    assert summary["busy"] == pytest.approx(190 / 1000)
    top = {op["op"]: op for op in summary["top"]}
    assert top["loop_fusion.1"]["source"] == "jvp(Decoder)/final_norm/add"
    assert top["gemm_fusion.3"]["category"] == "matmul"
    assert top["some_library_kernel"] == {"op": "some_library_kernel", "category": "other",
                                          "ms": pytest.approx(5e-6), "source": "",
                                          "location": ""}


def test_without_derived_lines_the_stream_events_are_read_by_their_hlo_op():
    ops = sp.hlo_ops(GPU_HLO)
    stream = [_event("sm90_gemm_kernel", 0, 40, hlo_op="gemm.1"),
              _event("nvjet_kernel", 40, 40, hlo_op="gemm.1"),
              _event("cudnn_fmha_kernel", 100, 10, hlo_op="custom-call.4"),
              _event("unknown_kernel", 200, 10)]
    profile = _profile(("/device:GPU:0", [("Stream #7", stream)]))
    summary = sp.summarize(sp.op_events(profile, ops), wall_s=1e-6, steps=1)
    assert summary["ms"]["matmul"] == pytest.approx(80e-6)
    assert summary["ms"]["attention"] == pytest.approx(10e-6)
    assert summary["ms"]["other"] == pytest.approx(10e-6)
    assert summary["busy"] == pytest.approx(100 / 1000)
    assert summary["device_to_host"] == 0


def test_a_gpu_run_whose_trace_holds_no_device_events_is_an_error_not_a_host_summary(
        monkeypatch):
    """Where the profiler cannot reach the GPU (a sandbox), the host's launch events must
    not pass for where the device spent its time; on the CPU they are the events."""
    import jax
    import jax.numpy as jnp

    if jax.default_backend() != "cpu":
        pytest.skip("stands in a CPU for a device the profiler cannot trace")
    step = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((64, 64))

    def run_steps(n):
        for _ in range(n):
            step(x).block_until_ready()

    hlo = step.lower(x).compile().as_text()
    assert sp.profile_steps(hlo, run_steps, steps=2, platform="cpu")["wall_ms"] > 0
    with pytest.raises(sp.ProfileError, match="no gpu events"):
        sp.profile_steps(hlo, run_steps, steps=2, platform="gpu")
    # A few stray kernels are summarised, with a warning that names the lines seen.
    stray = {"exclusive_ns": collections.Counter({"loop_fusion.1": 10}),
             "intervals": [(0, 10)], "ops": sp.hlo_ops(GPU_HLO),
             "device": True, "lines": {"XLA Ops": 1, "Stream #7": 0},
             "memcpys": collections.Counter()}
    monkeypatch.setattr(sp, "op_events", lambda profile, ops: stray)
    summary = sp.profile_steps(hlo, run_steps, steps=2, platform="gpu")
    assert re.search(r"cover 0\.0% of the wall time.*'XLA Ops' 1, 'Stream #7' 0",
                     summary["warning"])
    assert "warning: the device events cover" in sp.format_summary("a/b", summary)
    assert sp.format_summary("a/b", {"error": "ProfileError: x"}) == "  a/b: no profile: ProfileError: x"
