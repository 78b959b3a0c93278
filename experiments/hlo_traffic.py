"""``python -m experiments.hlo_traffic FILE``: the kernels of a compiled XLA program and the
bytes each reads and writes, from the HLO text XLA dumps after its optimizations
(``XLA_FLAGS=--xla_dump_to=DIR``, ``*after_optimizations.txt``).

What a step costs on a memory-bound GPU without timing it: a kernel is an instruction that
launches work (a fusion, a library call such as cuBLAS's or cuDNN's, a lone copy, the start
of an asynchronous one), in the entry computation or in a branch or body of its control flow
(``conditional``: each branch counted once, whichever runs; ``while``: its body as many
times as XLA knows it loops, ``known_trip_count``, else once and counted in
``unknown_trip_counts``; ``call``); its bytes are its operands' and its results' sizes,
what it must read and write at least, except where a fusion only gathers or slices from an
operand (it reads what it takes) or updates one in place (a scatter or dynamic update
slice: it writes the update alone). Parameters, constants, bitcasts, tuples and the
``-done`` halves of asynchronous pairs launch nothing. The sums compare two compiles of one
step (``bench --target`` for a GPU without one: the kernels XLA:GPU would launch;
``bench --live-peak`` writes each row's ``hlo_traffic``): the gradient norm's 711 → 202
kernels at 2.65B were counted so. Every branch of a conditional counts, so a step whose
chunks choose between two paths at run time (the perturbed head's shifted and exact
passes, ``lm.losses``) is charged both.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import re
import sys
from typing import Sequence

#: Bytes of an element of each HLO type (4-bit types: half a byte).
_TYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16, "token": 0}
#: Opcodes that launch no work of their own (nor does any ``*-done``).
_NOT_KERNELS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all",
                "opt-barrier", "partition-id", "replica-id", "add-dependency", "conditional",
                "while", "call"}
#: A conditional's branches (not a fusion's ``calls=``, nor a reduction's or a sort's
#: ``to_apply``, whose scalar ops are part of their kernel).
_BRANCHES = re.compile(r"\b(?:true_computation|false_computation)=%([\w.\-]+)"
                       r"|branch_computations=\{([^}]*)\}")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch: its instruction's name and opcode, the computation it is in, the
    ``op_name`` of its metadata (the JAX source path), and its bytes."""

    name: str
    opcode: str
    computation: str
    op_name: str
    bytes_read: float
    bytes_written: float
    runs: int = 1


def _element_bytes(text: str) -> float:
    """Bytes of one array type ``f32[4,128]{1,0}`` (0 for a type not in the table)."""
    found = re.match(r"\s*([a-z]\w*)\[([\d,]*)\]", text)
    if not found:
        return 0.0
    size = 1
    for dim in filter(None, found.group(2).split(",")):
        size *= int(dim)
    dtype = found.group(1)
    return size * _TYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _shape_bytes(shape: str) -> list[float]:
    """Bytes of each top-level element of a result type: one for an array, one per element
    of a tuple (a nested tuple's arrays summed)."""
    shape = re.sub(r"/\*.*?\*/", "", shape).strip()
    if not shape.startswith("("):
        return [_element_bytes(shape)]
    return [sum(_shape_bytes(part)) for part in _split_top_level(shape[1:-1])]


def _shape_and_rest(text: str) -> tuple[str, str]:
    """(the result type, the rest) of an instruction's right-hand side."""
    if text.startswith("("):
        depth = 0
        for i, char in enumerate(text):
            depth += char == "("
            depth -= char == ")"
            if depth == 0:
                return text[:i + 1], text[i + 1:].strip()
    shape, _, rest = text.partition(" ")
    return shape, rest.strip()


def _opcode_and_operands(rest: str) -> tuple[str, str, str]:
    """(opcode, operand list, attributes) of ``opcode(operands), attributes``."""
    opcode, _, tail = rest.partition("(")
    depth = 1
    for i, char in enumerate(tail):
        depth += char == "("
        depth -= char == ")"
        if depth == 0:
            return opcode.strip(), tail[:i], tail[i + 1:]
    return opcode.strip(), tail, ""


def _instructions(lines: list[str]):
    """Each instruction of a computation's ``lines``: (result name, result type, opcode,
    operand list, attributes, whether it is the ROOT)."""
    for line in lines:
        instruction = _INSTRUCTION.match(line)
        if instruction:
            shape, rest = _shape_and_rest(instruction.group(2))
            yield (instruction.group(1), shape, *_opcode_and_operands(rest),
                   line.lstrip().startswith("ROOT"))


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, entry


#: Fused ops that read only part of their first operand (what their result holds), and those
#: that update their first operand in place when they are the fusion's root.
_PARTIAL_READS = {"gather", "dynamic-slice", "slice"}
_IN_PLACE = {"scatter", "dynamic-update-slice"}
_PASS_THROUGH = {"bitcast", "reshape"}


def _partial_access(lines: list[str]) -> tuple[dict[int, float], float | None]:
    """What a fused computation reads of the parameters it only slices or gathers from, and
    writes when its root updates one in place: ({parameter number: bytes read}, bytes
    written or None). A parameter read only (through bitcasts and reshapes) as the first
    operand of a gather or a (dynamic) slice costs what those take; as the destination of
    the root's scatter or dynamic update slice, the rows it updates (a scatter's may add
    to them) or nothing, and that root writes its updates alone."""
    parameters: dict[str, int] = {}
    producers: dict[str, tuple[str, list[str], float]] = {}
    users: dict[str, list[tuple[str, str, int]]] = {}
    root = None
    for result, shape, opcode, operands, _, is_root in _instructions(lines):
        names = re.findall(r"%([\w.\-]+)", operands)
        producers[result] = (opcode, names, sum(_shape_bytes(shape)))
        if opcode == "parameter":
            parameters[result] = int(operands)
        for position, name in enumerate(names):
            users.setdefault(name, []).append((result, opcode, position))
        if is_root:
            root = result

    # The root's in-place update (under bitcasts), its destination parameter, its updates.
    update = root
    while update is not None and producers[update][0] in _PASS_THROUGH:
        update = producers[update][1][0]
    in_place, updates = None, []
    if update is not None and producers[update][0] not in _IN_PLACE:
        update = None
    if update is not None:
        opcode, names, _ = producers[update]
        destination = names[0]
        while producers.get(destination, ("",))[0] in _PASS_THROUGH:
            destination = producers[destination][1][0]
        if destination in parameters:
            # scatter(operands…, indices, updates…) has as many updates as operands.
            count = (len(names) - 1) // 2 if opcode == "scatter" else 1
            first = len(names) - count if opcode == "scatter" else 1
            updates = [producers.get(name, ("", [], 0.0))[2]
                       for name in names[first:first + count]]
            in_place = sum(updates)
        else:
            update = None

    def reads(name: str) -> float | None:
        total = 0.0
        for user, opcode, position in users.get(name, []):
            if opcode in _PASS_THROUGH and users.get(user):
                part = reads(user)
            elif opcode in _PARTIAL_READS and position == 0:
                part = producers[user][2]
            elif user == update and position < len(updates):
                part = updates[position] if opcode == "scatter" else 0.0
            else:
                return None
            if part is None:
                return None
            total += part
        return total

    partial = {number: part for name, number in parameters.items()
               if (part := reads(name)) is not None}
    return partial, in_place


def kernels(hlo_text: str) -> tuple[list[Kernel], int]:
    """(every kernel of the module in ``hlo_text``, entry first, with the times it runs a
    step; the number of loops whose trip count XLA does not know, each counted once)."""
    computations, entry = _computations(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    found: list[Kernel] = []
    seen: set[str] = set()
    unknown = 0

    def called(attribute: str, attributes: str) -> str:
        return re.search(rf"\b{attribute}=%([\w.\-]+)", attributes).group(1)

    def walk(name: str, runs: int) -> None:
        nonlocal unknown
        if name in seen or name not in computations:
            return
        seen.add(name)
        sizes: dict[str, list[float]] = {}
        for result, shape, opcode, operands, attributes, _ in _instructions(computations[name]):
            sizes[result] = _shape_bytes(shape)
            for single, listed in _BRANCHES.findall(attributes):
                for branch in [single] if single else re.findall(r"%([\w.\-]+)", listed):
                    walk(branch, runs)
            if opcode == "call":
                walk(called("to_apply", attributes), runs)
            elif opcode == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                unknown += trips is None
                n = int(trips.group(1)) if trips else 1
                walk(called("body", attributes), runs * n)
                walk(called("condition", attributes), runs * (n + 1 if trips else 1))
            if opcode in _NOT_KERNELS or opcode.endswith("-done"):
                continue
            partial, in_place = {}, None
            if opcode == "fusion":
                partial, in_place = _partial_access(computations.get(called("calls", attributes), []))
            read = 0.0
            for position, (operand, index) in enumerate(
                    re.findall(r"%([\w.\-]+)(?:#(\d+))?", operands)):
                element = sizes.get(operand, [0.0])
                whole = element[int(index)] if index and int(index) < len(element) else sum(element)
                read += partial.get(position, whole)
            written = sizes[result] if in_place is None else [in_place]
            if opcode.endswith("-start") and len(written) > 1:
                # What it writes: an async-start's (operands, result, context) element 1; a
                # copy's (destination, source, …) or a collective's (operand, result) largest.
                written = [written[1] if opcode == "async-start" else max(written)]
            op_name = re.search(r'op_name="([^"]*)"', attributes)
            found.append(Kernel(result, opcode, name, op_name.group(1) if op_name else "",
                                read, sum(written), runs))

    walk(entry, 1)
    return found, unknown


def summary(hlo_text: str) -> dict[str, float]:
    """``{"kernels", "bytes", "unknown_trip_counts"}`` of the module in ``hlo_text``: the
    launches a step makes, the bytes they read and write together, and the loops counted
    once for want of a trip count."""
    found, unknown = kernels(hlo_text)
    return {"kernels": sum(k.runs for k in found),
            "bytes": float(sum(k.runs * (k.bytes_read + k.bytes_written) for k in found)),
            "unknown_trip_counts": unknown}


def by_source(found: Sequence[Kernel]) -> list[tuple[str, int, float, float]]:
    """(group, kernels, bytes read, bytes written) per kind of kernel and JAX source, the
    blocks' copies of a kernel together (``layers_7`` → ``layers_*``), most bytes first."""
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in found:
        kind = re.sub(r"[.\d]+$", "", k.name)
        source = re.sub(r"layers_\d+", "layers_*", k.op_name)
        key = f"{kind} | {source}"
        group = groups[key]
        group[0] += k.runs
        group[1] += k.runs * k.bytes_read
        group[2] += k.runs * k.bytes_written
    rows = [(key, int(n), r, w) for key, (n, r, w) in groups.items()]
    return sorted(rows, key=lambda row: -(row[2] + row[3]))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.hlo_traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="an HLO text file XLA dumped after its optimizations (or it "
                                "gzipped, *.gz: benchmarks/gpu_session.sh's DUMP=1)")
    p.add_argument("--top", type=int, default=40, help="groups to list (default 40)")
    p.add_argument("--match", default="", help="only the groups this regular expression finds")
    args = p.parse_args(argv)
    try:
        with (gzip.open if args.file.endswith(".gz") else open)(args.file, "rt") as f:
            text = f.read()
        found, _ = kernels(text)
        pattern = re.compile(args.match)
    except (OSError, EOFError, UnicodeDecodeError, ValueError, re.error) as e:
        p.exit(2, f"{p.prog}: {args.file if not isinstance(e, re.error) else '--match'}: {e}\n")
    total = summary(text)
    unknown = total["unknown_trip_counts"]
    print(f"{total['kernels']} kernels, {total['bytes'] / 1e9:.2f} GB read and written"
          + (f" ({unknown} loops of unknown trip count counted once)" if unknown else ""))
    rows = [row for row in by_source(found) if pattern.search(row[0])][:args.top]
    for key, n, read, written in rows:
        print(f"{(read + written) / 1e9:8.3f} GB  {n:5d} kernels  read {read / 1e9:7.3f}  "
              f"written {written / 1e9:7.3f}  {key}")


if __name__ == "__main__":
    main(sys.argv[1:])
