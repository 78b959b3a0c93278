"""The input precision of every matmul a function asks XLA for, read from its jaxpr."""

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
