"""``python -m experiments.hlo_traffic FILE``: the kernels of a compiled XLA program and the
bytes each reads and writes, from the HLO text XLA dumps after its optimizations
(``XLA_FLAGS=--xla_dump_to=DIR``, ``*after_optimizations.txt``).

What a step costs on a memory-bound GPU without timing it: a kernel is an instruction that
launches work (a fusion, a library call such as cuBLAS's or cuDNN's, a lone copy), in the
entry computation or in a branch or body of its control flow (``conditional``, ``while``,
``call``: each branch counted once, whichever runs); its bytes are its operands' and its
results' sizes, what it must read and write at least. Parameters, constants, bitcasts and
tuples launch nothing. The sums compare two compiles of one step (``bench --target`` for a
GPU without one: the kernels XLA:GPU would launch; ``bench --live-peak`` writes each row's
``hlo_traffic``): the gradient norm's 711 → 202 kernels at 2.65B were counted so. A
kernel that reads only part of an operand (a slice fused into its reader) is counted with
the whole operand.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys
from typing import Sequence

#: Bytes of an element of each HLO type (4-bit types: half a byte).
_TYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
               "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
               "c64": 8, "c128": 16, "token": 0}
#: Opcodes that launch no work of their own.
_NOT_KERNELS = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all",
                "opt-barrier", "partition-id", "replica-id", "add-dependency", "conditional",
                "while", "call"}
#: Attributes naming the computations control flow runs (not a fusion's ``calls=``).
_CONTROL_FLOW = re.compile(r"\b(?:true_computation|false_computation|body|condition|to_apply)"
                           r"=%([\w.\-]+)|branch_computations=\{([^}]*)\}")
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


def kernels(hlo_text: str) -> list[Kernel]:
    """Every kernel of the module in ``hlo_text`` (module docstring), entry first."""
    computations, entry = _computations(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    found: list[Kernel] = []
    seen: set[str] = set()

    def walk(name: str) -> None:
        if name in seen or name not in computations:
            return
        seen.add(name)
        sizes: dict[str, list[float]] = {}
        for line in computations[name]:
            instruction = _INSTRUCTION.match(line)
            if not instruction:
                continue
            result, rhs = instruction.group(1), instruction.group(2)
            shape, rest = _shape_and_rest(rhs)
            sizes[result] = _shape_bytes(shape)
            opcode, operands, attributes = _opcode_and_operands(rest)
            for single, listed in _CONTROL_FLOW.findall(attributes):
                for called in [single] if single else re.findall(r"%([\w.\-]+)", listed):
                    walk(called)
            if opcode in _NOT_KERNELS:
                continue
            read = 0.0
            for operand, index in re.findall(r"%([\w.\-]+)(?:#(\d+))?", operands):
                element = sizes.get(operand, [0.0])
                read += element[int(index)] if index and int(index) < len(element) else sum(element)
            op_name = re.search(r'op_name="([^"]*)"', attributes)
            found.append(Kernel(result, opcode, name, op_name.group(1) if op_name else "",
                                read, sum(sizes[result])))

    walk(entry)
    return found


def summary(found: Sequence[Kernel]) -> dict[str, float]:
    """``{"kernels", "bytes"}``: how many, and the bytes they read and write together."""
    return {"kernels": len(found),
            "bytes": float(sum(k.bytes_read + k.bytes_written for k in found))}


def by_source(found: Sequence[Kernel]) -> list[tuple[str, int, float, float]]:
    """(group, kernels, bytes read, bytes written) per kind of kernel and JAX source, the
    blocks' copies of a kernel together (``layers_7`` → ``layers_*``), most bytes first."""
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in found:
        kind = re.sub(r"[.\d]+$", "", k.name)
        source = re.sub(r"layers_\d+", "layers_*", k.op_name)
        key = f"{kind} | {source}"
        group = groups[key]
        group[0] += 1
        group[1] += k.bytes_read
        group[2] += k.bytes_written
    rows = [(key, int(n), r, w) for key, (n, r, w) in groups.items()]
    return sorted(rows, key=lambda row: -(row[2] + row[3]))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.hlo_traffic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="an HLO text file XLA dumped after its optimizations")
    p.add_argument("--top", type=int, default=40, help="groups to list (default 40)")
    p.add_argument("--match", default="", help="only the groups this regular expression finds")
    args = p.parse_args(argv)
    try:
        with open(args.file) as f:
            found = kernels(f.read())
        pattern = re.compile(args.match)
    except (OSError, UnicodeDecodeError, ValueError, re.error) as e:
        p.exit(2, f"{p.prog}: {args.file if not isinstance(e, re.error) else '--match'}: {e}\n")
    total = summary(found)
    print(f"{total['kernels']} kernels, {total['bytes'] / 1e9:.2f} GB read and written")
    rows = [row for row in by_source(found) if pattern.search(row[0])][:args.top]
    for key, n, read, written in rows:
        print(f"{(read + written) / 1e9:8.3f} GB  {n:5d} kernels  read {read / 1e9:7.3f}  "
              f"written {written / 1e9:7.3f}  {key}")


if __name__ == "__main__":
    main(sys.argv[1:])
