"""The input precision of every matmul a function asks XLA for, read from its jaxpr."""

import math

import jax
from jax.extend.core import jaxprs_in_params


def matmul_input_dtypes(fn, *args) -> set[str]:
    """For each ``dot_general`` in ``fn``'s jaxpr (sub-jaxprs included), the dtype its
    inputs are multiplied in: "bfloat16" when both operands are bf16 or its precision is a
    ``BF16_BF16_*`` dot algorithm (which rounds float32 operands to bf16, as
    ``jax.nn.dot_product_attention`` asks for its scores), else the operand dtypes."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                precision = eqn.params["precision"]
                if isinstance(precision, jax.lax.DotAlgorithmPreset) and precision.name.startswith("BF16_BF16"):
                    yield "bfloat16"
                else:
                    yield "/".join(sorted({str(v.aval.dtype) for v in eqn.invars}))
            for sub in jaxprs_in_params(eqn.params):
                yield from walk(sub)
    return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def matmul_flops(fn, *args) -> float:
    """2·M·N·K summed over every ``dot_general`` that ``fn(*args)`` runs, read from its
    jaxpr: a scan's body counted once per iteration, a cond's costliest branch (an upper
    bound where a branch is skipped at run time), every other sub-jaxpr (remat's
    recomputation, jit, custom rules) once. Unlike XLA's cost analysis, loops count by their
    trip count."""
    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                    lhs[i] for i in contracting)
            elif name == "scan":
                total += eqn.params["length"] * walk(eqn.params["jaxpr"].jaxpr)
            elif name == "cond":
                total += max(walk(branch.jaxpr) for branch in eqn.params["branches"])
            else:
                total += sum(walk(sub) for sub in jaxprs_in_params(eqn.params))
        return total
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)
