"""Where a compiled step's time goes: a profiler trace of a few steps, summed per HLO op.

    summary = profile_steps(compiled.as_text(), run_steps, steps=3)

``run_steps(n)`` runs ``n`` steps and blocks until they finish; it runs under
``jax.profiler.trace`` and the trace (an XSpace) is read back with
``jax.profiler.ProfileData``. Every op event is matched to its instruction in the compiled
HLO (by the event's ``hlo_op`` stat, else its name) and timed exclusively (a ``while`` or
``conditional`` is charged only the time its body ops do not cover). The summary, per step:

  wall_ms             wall-clock time of a step.
  busy                the fraction of the wall time in which some op of the step ran. On a
                      GPU, what is missing is launch overhead and host round trips (a
                      ``conditional``'s predicate or a ``while``'s condition read back).
  ms                  exclusive op time per :data:`CATEGORIES` entry.
  top                 the ops that took longest, with their category, the JAX source of
                      each (the HLO ``op_name``, less the ``jit(...)/`` prefix) and the line
                      of Python that made it (``lm/losses.py:87 fn``).
  by_location         the lines of Python whose ops took longest, every op of a line summed
                      (a kernel in each of 32 layers, a matmul's forward and backward).
  device_to_host      device-to-host copies (memcpy events) per step, GPU only.
  memcpy_events       every memcpy and memset event per step by its name, GPU only.

On a GPU the events are the kernels and copies on the device planes' stream lines
(``/device:GPU:0``; the profiler's derived lines, such as ``XLA Ops``, repeat them). A
kernel is matched to its HLO instruction by its ``hlo_op`` stat, else by its name (XLA
names a fusion's kernel after the fusion, ``.`` and ``-`` written ``_``). A kernel that
ran inside a command buffer (a CUDA graph, XLA:GPU's default for most of a step) may
carry no ``hlo_op``, or the command buffer's, and then be missing from ``XLA Ops``: the
first H200 trace matched no kernel there. (XLA runs command buffers op by op while a
profiler is active, unless ``--xla_enable_command_buffers_during_profiling=true``: then
the traced steps have the launch gaps of a step without graphs.) A library kernel (cuBLAS, cuDNN) matched to no
instruction is put in its category by its own name and listed under that name. Where the
device events cover under :data:`MIN_DEVICE_BUSY` of the wall time the summary carries a
``warning`` with each device line's event count.

On the CPU the events are the host plane's XLA thunks, which run on
several threads, so there ``ms`` may add up to more than ``wall_ms``.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax

CATEGORIES = ("matmul", "attention", "fusion", "copy", "collective", "control", "other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
# The compiled module's source tables (``FileNames``, ``FunctionNames``, ``FileLocations``,
# ``StackFrames``): entries "<id> <value>", one per line, before the first computation.
_TABLE_ENTRY = re.compile(r"^(\d+) (.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_DEVICE_TO_HOST = re.compile(r"memcpy ?d(evice)?to ?h|memcpyd2h", re.IGNORECASE)
_MEMCPY = re.compile(r"memcpy|memset", re.IGNORECASE)
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all", "send", "recv")


class Op(NamedTuple):
    """An instruction of the compiled step: its kind, its JAX source (the ``op_name``:
    transforms and module path, less ``jit(...)/``) and the line of Python that made it
    (``file:line function``, the innermost frame XLA kept; "" where it kept none)."""

    category: str
    source: str
    location: str = ""


def hlo_ops(hlo_text: str) -> dict[str, Op]:
    """Each instruction of a compiled HLO module (``compiled.as_text()``) by name, as an
    :class:`Op`, the category one of :data:`CATEGORIES`.

    matmul: dot and convolution, cuBLAS/cuBLASLt custom calls, and fusions whose fused
    computation holds a dot (XLA:GPU's Triton GEMMs, XLA:CPU's library fusions); attention:
    cuDNN's fused attention (``__cudnn$fmha*``); fusion: every other fusion (elementwise
    and reduction kernels); copy: copy and transpose; collective: cross-device
    communication; control: while, conditional and call.
    """
    computations: dict[str, list[str]] = {}
    current: list[str] = []
    tables: dict[str, dict[int, str]] = {}
    table: dict[int, str] | None = None
    for line in hlo_text.splitlines():
        entry = _TABLE_ENTRY.match(line)
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
        elif table is not None and entry:
            table[int(entry.group(1))] = entry.group(2)
        elif line and not line[0].isspace() and line.rstrip().endswith("{"):
            table = None
            head = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = computations.setdefault(head.lstrip("%"), [])
        elif _INSTRUCTION.match(line):
            current.append(line)

    def holds_dot(computation: str) -> bool:
        return any(_opcode(line) in ("dot", "convolution")
                   for line in computations.get(computation, ()))

    frames = _frame_locations(tables)
    ops = {}
    for lines in computations.values():
        for line in lines:
            name, rest = _INSTRUCTION.match(line).groups()
            ops[name] = Op(_category(_opcode(line), rest, holds_dot), _source(rest),
                           _location(rest, frames))
    return ops


def _opcode(line: str) -> str:
    rest = _INSTRUCTION.match(line).group(2)
    found = _OPCODE.search(" " + rest)
    return found.group(1) if found else ""


def _category(opcode: str, rest: str, holds_dot: Callable[[str], bool]) -> str:
    if opcode in ("dot", "convolution"):
        return "matmul"
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        target = target.group(1).lower() if target else ""
        if "fmha" in target:
            return "attention"
        if any(word in target for word in ("gemm", "matmul", "cublas")):
            return "matmul"
        return "other"
    if opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if "triton_gemm" in rest or (called and holds_dot(called.group(1))):
            return "matmul"
        return "fusion"
    if opcode in ("copy", "copy-start", "copy-done", "transpose"):
        return "copy"
    if opcode.startswith(_COLLECTIVES):
        return "collective"
    if opcode in ("while", "conditional", "call"):
        return "control"
    return "other"


def _source(rest: str) -> str:
    found = re.search(r'op_name="([^"]*)"', rest)
    return re.sub(r"^jit\([^)]*\)/", "", found.group(1)) if found else ""


def _frame_locations(tables: dict[str, dict[int, str]]) -> dict[int, str]:
    """``file:line function`` of every stack frame of the module's source tables, by id:
    the frame's own location (its innermost; the parents are left out)."""
    def field(entry: str, key: str) -> int:
        found = re.search(rf"\b{key}=(\d+)", entry)
        return int(found.group(1)) if found else -1

    out = {}
    for frame_id, frame in tables.get("StackFrames", {}).items():
        location = tables.get("FileLocations", {}).get(field(frame, "file_location_id"), "")
        path = tables.get("FileNames", {}).get(field(location, "file_name_id"), "").strip('"')
        function = tables.get("FunctionNames", {}).get(field(location, "function_name_id"), "")
        line = field(location, "line")
        if path and line >= 0:
            out[frame_id] = f"{_short_path(path)}:{line} {function.strip(chr(34))}".rstrip()
    return out


def _location(rest: str, frames: dict[int, str]) -> str:
    """``file:line function`` of an instruction: its ``stack_frame_id``'s
    (:func:`_frame_locations`), or its ``source_file``/``source_line`` (older XLA)."""
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    if frame and int(frame.group(1)) in frames:
        return frames[int(frame.group(1))]
    found = re.search(r'source_file="([^"]*)" source_line=(\d+)', rest)
    return f"{_short_path(found.group(1))}:{found.group(2)}" if found else ""


def _short_path(path: str) -> str:
    """A path as the reader knows it: an installed package's from the package, this
    checkout's relative to it."""
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    here = os.getcwd() + os.sep
    return path[len(here):] if path.startswith(here) else path


# Below this a training step's trace is likely missing kernels (the first H200 trace: 0.2%,
# a few fusions), though a launch-bound step can be this idle too: a warning, not an error.
MIN_DEVICE_BUSY = 0.05
# Ops and lines kept in a summary: a GPU loan is short, and the H200's profiles of 10 left
# most of a 124M step's fusions unnamed.
TOP = 40


class ProfileError(RuntimeError):
    """The trace cannot say where the time went (no trace written, no device events)."""


def profile_steps(hlo_text: str, run_steps: Callable[[int], Any], steps: int = 3,
                  top: int = TOP, *, platform: str | None = None) -> dict:
    """Trace ``run_steps(steps)`` and summarise it per step (module docstring).

    ``platform`` is where the steps run (default: the first device's). Off the CPU a
    trace without that device's events (a sandbox where the profiler cannot reach the
    GPU) is a :class:`ProfileError`, not a summary of the host's launches; one whose
    device events cover under :data:`MIN_DEVICE_BUSY` of the wall time is summarised with a
    ``warning``.
    """
    platform = platform or jax.devices()[0].platform
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            t0 = time.perf_counter()
            run_steps(steps)
            wall_s = time.perf_counter() - t0
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise ProfileError("the profiler wrote no trace")
        profile = jax.profiler.ProfileData.from_file(files[0])
    events = op_events(profile, hlo_ops(hlo_text))
    if platform != "cpu" and not (events["device"] and events["intervals"]):
        raise ProfileError(f"the trace holds no {platform} events (the profiler could not "
                           f"trace the device here); device lines: {_lines_seen(events)}")
    summary = summarize(events, wall_s, steps, top)
    if platform != "cpu" and summary["busy"] < MIN_DEVICE_BUSY:
        summary["warning"] = (f"the device events cover {summary['busy']:.1%} of the wall "
                              f"time: kernels may be missing from the trace (device lines: "
                              f"{_lines_seen(events)})")
    return summary


def _lines_seen(events: dict) -> str:
    return ", ".join(f"{name!r} {count}" for name, count in events["lines"].items()) or "none"


# Lines the profiler derives from the stream lines, or fills with its own bookkeeping
# (tsl/profiler/utils/xplane_schema.cc; XLA's CUPTI collector): not kernels.
NON_KERNEL_LINES = frozenset({
    "Steps", "XLA Modules", "XLA Ops", "Async XLA Ops", "TensorFlow Ops",
    "TensorFlow Name Scope", "Framework Ops", "Framework Name Scope", "Launch Stats",
    "Source code", "_counters_", "Host Offload Ops", "CUPTI overhead",
})

# Kernels that carry no hlo_op (launched inside a CUDA graph) and match no instruction's
# name, by what their names say; first match wins.
_KERNEL_CATEGORIES = (
    ("attention", ("fmha", "sdpa", "flash", "attention")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "matmul")),
    ("fusion", ("fusion",)),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("collective", ("nccl",)),
)


def op_events(profile: Any, ops: dict[str, Op]) -> dict:
    """The trace's op events of the module: exclusive ns per op name, busy intervals
    (start, end) in ns, the count of each memcpy or memset event's name, and ``ops`` with the
    library kernels that no instruction claims added under their own names."""
    device = [p for p in profile.planes if p.name.startswith("/device:")]
    if device:
        return _device_events(device, ops)
    exclusive: collections.Counter = collections.Counter()
    intervals = []
    for plane in (p for p in profile.planes if p.name == "/host:CPU"):
        for line in plane.lines:
            events = [(event.start_ns, event.start_ns + event.duration_ns, _op_name(event))
                      for event in line.events]
            events = sorted((e for e in events if e[2] in ops), key=lambda e: (e[0], -e[1]))
            _add_exclusive(events, exclusive)
            intervals += [(start, end) for start, end, _ in events]
    return {"exclusive_ns": exclusive, "intervals": intervals, "ops": ops, "device": False,
            "lines": {}, "memcpys": collections.Counter()}


def _device_events(planes: list[Any], ops: dict[str, Op]) -> dict:
    ops = dict(ops)
    by_kernel_name = {re.sub(r"[.\-]", "_", name): name for name in ops}
    exclusive: collections.Counter = collections.Counter()
    intervals, lines, memcpys = [], {}, collections.Counter()
    for plane in planes:
        kernel_lines = [line for line in plane.lines if line.name not in NON_KERNEL_LINES]
        # The CUPTI collector names each stream's line "Stream #<id>(...)"; where it does,
        # other lines (its bookkeeping, under names not listed above) are left out.
        streams = [line for line in kernel_lines if line.name.startswith("Stream")]
        for line in plane.lines:  # jaxlib 0.11's events have no len()
            lines[line.name] = lines.get(line.name, 0) + sum(1 for _ in line.events)
        for line in streams or kernel_lines:
            for event in line.events:
                name = _kernel_op(event, ops, by_kernel_name)
                exclusive[name] += event.duration_ns
                intervals.append((event.start_ns, event.start_ns + event.duration_ns))
                if _MEMCPY.search(event.name):
                    memcpys[event.name] += 1
    return {"exclusive_ns": exclusive, "intervals": intervals, "ops": ops, "device": True,
            "lines": lines, "memcpys": memcpys}


def _kernel_op(event: Any, ops: dict[str, Op], by_kernel_name: dict) -> str:
    """The instruction a kernel ran for: its ``hlo_op``, unless that is missing or a
    control op (a command buffer's call runs many kernels: each is charged by its own name),
    else the instruction its name spells, else the kernel's own name (added to ``ops`` in
    the category its name says)."""
    name = _op_name(event)
    if name in ops and ops[name][0] != "control":
        return name
    name = by_kernel_name.get(event.name) or event.name
    ops.setdefault(name, Op(_kernel_category(name), ""))
    return name


def _kernel_category(kernel: str) -> str:
    lowered = kernel.lower()
    return next((category for category, words in _KERNEL_CATEGORIES
                 if any(word in lowered for word in words)), "other")


def _op_name(event: Any) -> str:
    # Not dict(event.stats): jaxlib 0.11's stats type warns when converted under Python 3.12.
    stats = {key: value for key, value in event.stats}
    name = stats.get("hlo_op") or event.name.split(" = ")[0]
    return str(name).lstrip("%")


def _add_exclusive(events: list[tuple[float, float, str]], exclusive) -> None:
    """Each event's duration less its children's (events on one line nest, never cross)."""
    stack: list[tuple[float, str]] = []
    for start, end, name in events:
        while stack and stack[-1][0] <= start:
            stack.pop()
        exclusive[name] += end - start
        if stack:
            exclusive[stack[-1][1]] -= min(end, stack[-1][0]) - start
        stack.append((end, name))


def _covered(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(events: dict, wall_s: float, steps: int, top: int = TOP) -> dict:
    """Per-step figures from :func:`op_events` (module docstring)."""
    ops, exclusive = events["ops"], events["exclusive_ns"]
    per_step_ms = 1e-6 / steps
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    for name, ns in exclusive.items():
        by_category[ops[name][0]] += ns * per_step_ms
    by_location: collections.Counter = collections.Counter()
    for name, ns in exclusive.items():
        by_location[ops[name].location or f"({ops[name].category}, no source line)"] += ns
    return {
        "steps": steps,
        "wall_ms": 1e3 * wall_s / steps,
        "busy": _covered(events["intervals"]) * 1e-9 / wall_s,
        "ms": by_category,
        "top": [{"op": name, "category": ops[name].category, "ms": ns * per_step_ms,
                 "source": ops[name].source, "location": ops[name].location}
                for name, ns in exclusive.most_common(top)],
        # Every op a line of Python made, summed: the 12 or 32 layers' copies of one kernel,
        # the forward and backward of one matmul, add up where the code can be changed.
        "by_location": [{"location": location, "ms": ns * per_step_ms}
                        for location, ns in by_location.most_common(top)],
        "device_to_host": (sum(n for name, n in events["memcpys"].items()
                               if _DEVICE_TO_HOST.search(name)) / steps
                           if events["device"] else None),
        # Every copy by its own name, however short: whether a lax.cond's predicate crossed
        # to the host should not hang on one spelling.
        "memcpy_events": ({name: n / steps for name, n in events["memcpys"].most_common()}
                          if events["device"] else None),
    }


def format_summary(label: str, summary: dict) -> str:
    """Three lines: the time per category and busy fraction, the three longest ops, the
    three lines of Python whose ops took longest (or one line: why there is no profile)."""
    if "error" in summary:
        return f"  {label}: no profile: {summary['error']}"
    wall = summary["wall_ms"]
    parts = [f"{c} {ms / wall:.0%}" for c, ms in summary["ms"].items() if ms >= 0.005 * wall]
    copies = summary["device_to_host"]
    lines = [f"  {label}: profile of {summary['wall_ms']:.1f} ms/step: busy "
             f"{summary['busy']:.0%}; " + ", ".join(parts)
             + ("" if copies is None else f"; {copies:g} device-to-host copies/step")]
    if "warning" in summary:
        lines.append(f"    warning: {summary['warning']}")
    lines.append("    longest: " + "; ".join(
        f"{op['op']} ({op['category']}, {op['ms']:.2f} ms) {op['source'][-60:]}"
        for op in summary["top"][:3]))
    if summary.get("by_location"):  # not in profiles written before it was
        lines.append("    by line: " + "; ".join(
            f"{entry['location']} {entry['ms']:.2f} ms" for entry in summary["by_location"][:3]))
    return "\n".join(lines)
