"""The work of one DPO step, counted two ways: by formula and from the traced program.

By formula (the conventions of :mod:`experiments.bench`):

  model_flops     8 · P · tokens: the policy forward and backward (6 · P) and the frozen
                  reference forward (2 · P), the work any DPO step must do; MFU's numerator.
  head extra      logits-SAM's extra output-layer work, the FLOP lower bound of its overhead.

From the jaxpr (:func:`matmul_flops`): 2 · M · N · K summed over every matmul the step
actually runs — rematerialised forwards, SAM's second pass, a chunked head's recomputed
logits and the attention kernels included — the numerator of the hardware FLOP
utilisation (HFU). It reads the program JAX hands to XLA, so it is the same on every
backend (XLA's own cost analysis counts a loop body once, and on a GPU leaves cuBLAS and
cuDNN calls out).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.extend.core import jaxprs_in_params

from lm.losses import keeps_softmax_gradient

# cuDNN's fused attention (jax.nn.dot_product_attention(implementation="cudnn")): one
# primitive each way, whose matmuls the jaxpr does not show.
_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"
_ATTENTION_BACKWARD = "dot_product_attention_bwd_wrapper"
_BTNH = 0  # jax's AttentionLayout.BTNH, the one jax.nn.dot_product_attention passes


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or ``ShapeDtypeStruct``s."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def tokens_per_step(pairs: int, seq: int) -> int:
    """Tokens a step processes: both sequences of every pair, prompt and padding included."""
    return pairs * 2 * seq


def model_flops(n_params: int, tokens: int, reference: str) -> float:
    """8 · P · tokens (frozen reference) or 6 · P · tokens (precomputed reference).

    2 · P FLOPs per token for a forward, 4 · P for its backward; the frozen reference adds
    one forward. Attention-score FLOPs are left out, as in the usual MFU convention.
    """
    per_token = 6 + (2 if reference == "frozen" else 0)
    return float(per_token) * n_params * tokens


def is_chunked(seq: int, chunk_size: int | None) -> bool:
    """Whether :func:`lm.losses.token_logps` runs the head chunk by chunk at this length."""
    return chunk_size is not None and chunk_size < seq - 1


def head_positions(pairs: int, seq: int, prompt: int, chunk_size: int | None) -> int:
    """Positions that go through the policy head, N.

    Unchunked: every next-token prediction, B·2·(T−1). Chunked (:func:`lm.losses.token_logps`):
    whole chunks of c target positions, less the ``prompt // c`` leading chunks whose
    targets are all prompt tokens, which skip the head.
    """
    if not is_chunked(seq, chunk_size):
        return pairs * 2 * (seq - 1)
    chunks = -(-seq // chunk_size)
    return pairs * 2 * (chunks - prompt // chunk_size) * chunk_size


def head_chunk_share(seq: int, prompt: int, chunk_size: int | None) -> float:
    """The share of head chunks that run their matmuls when every row has a ``prompt``-token
    prompt: the ``cond_share`` that makes :func:`matmul_flops` exact for such a batch."""
    if not is_chunked(seq, chunk_size):
        return 1.0
    chunks = -(-seq // chunk_size)
    return 1.0 - (prompt // chunk_size) / chunks


def recomputes_head_logits(seq: int, chunk_size: int | None, dtype: Any) -> bool:
    """Whether the chunked head's backward recomputes each chunk's logits (features of
    ``dtype``): chunked, with more chunks than :func:`lm.losses.keeps_softmax_gradient` keeps
    the softmax gradients of."""
    return is_chunked(seq, chunk_size) and not keeps_softmax_gradient(seq, chunk_size, dtype)


def logits_sam_extra_flops(positions: int, vocab: int, width: int, *, chunked: bool = False,
                           recomputed: bool = False, split: bool = False,
                           trunk_params: int = 0, tokens: int = 0) -> float:
    """Logits-SAM's extra work, 4 · N · V · d: the inner head forward ``h Wᵀ`` (2NVd) and the
    head gradient ``gᵀ h`` (2NVd) that set the perturbation (paper §3.3, Algorithm 1).

    ``recomputed`` (:func:`recomputes_head_logits`): 6 · N · V · d. The head gradient needs
    every sequence's log-prob first (the DPO cotangent of a token is its sequence's), so the
    inner pass runs the chunks forward and then backward; a backward that recomputes each
    chunk's logits, rather than reading the softmax gradients its forward kept, does one
    more 2NVd (tests/lm/test_objectives.py counts every matmul of both steps). The plain
    head is then 8 · N · V · d, not 6.

    ``split`` (``--head-dtype split``, :func:`lm.losses.split_token_logps`): the head's
    matmuls are the inner pass's h Wᵀ, g0 W and gᵀ h (the plain gradient's, which the
    perturbed pass does not repeat), the perturbed forward h Wᵀ (which the inner pass can
    share: the same product) and h eᵀ, and the backward Δg W, g' e and Δgᵀ h: 14 · N · V · d
    (16 unshared) against plain's 6, so 8 · N · V · d extra, plus the trunk's second
    backward pass, 4 · P_trunk · tokens (P_trunk: the parameters outside the embedding and
    head matrices). ``chunked``, nothing is shared and the perturbed chunks' forwards (h Wᵀ
    and h eᵀ) are recomputed for their backward, as the inner pass recomputes or keeps
    what plain's head does: 14 · N · V · d extra either way (22 against 8 ``recomputed``,
    20 against 6 kept).
    """
    if split:
        return (14.0 if chunked else 8.0) * positions * vocab * width + (
            4.0 * trunk_params * tokens)
    return (6.0 if recomputed else 4.0) * positions * vocab * width


def matmul_flops(fn: Callable, *args: Any, cond_share: float = 1.0) -> float:
    """:func:`jaxpr_matmul_flops` of ``fn(*args)``'s jaxpr."""
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args), cond_share=cond_share)


def jaxpr_matmul_flops(closed_jaxpr: Any, *, cond_share: float = 1.0) -> float:
    """2·M·N·K summed over every matmul of a closed jaxpr (``jax.make_jaxpr``'s, or a jitted
    function's ``.trace(...).jaxpr``).

    A ``dot_general`` counts its 2·(output size)·(contracted size). cuDNN's fused attention
    counts what XLA's attention would, 4·B·N·T·S·H forward and 8·B·N·T·S·H backward
    (QKᵀ and PV, and their transposes) for B·N heads of T queries and S keys, masked
    entries included, so the count does not depend on the attention implementation.
    A scan's body counts once per iteration; remat's recomputation, custom rules and
    other sub-jaxprs once each. A ``cond`` counts its cheapest branch plus ``cond_share``
    of the difference to its costliest: 1.0, an upper bound; for a DPO step, where the
    only branches with matmuls are the head chunks that skip the prompt,
    :func:`head_chunk_share` makes it exact. A matmul whose result nothing uses would be
    counted though XLA removes it; the steps of :mod:`lm.objectives` trace none.
    """
    def walk(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                    lhs[i] for i in contracting)
            elif name in (_ATTENTION_FORWARD, _ATTENTION_BACKWARD):
                total += _attention_flops(eqn, backward=name == _ATTENTION_BACKWARD)
            elif name == "scan":
                total += eqn.params["length"] * walk(eqn.params["jaxpr"].jaxpr)
            elif name == "cond":
                branches = [walk(branch.jaxpr) for branch in eqn.params["branches"]]
                total += min(branches) + cond_share * (max(branches) - min(branches))
            else:
                total += sum(walk(sub) for sub in jaxprs_in_params(eqn.params))
        return total

    return walk(closed_jaxpr.jaxpr)


def _attention_flops(eqn: Any, *, backward: bool) -> float:
    if eqn.params["layout"] != _BTNH:
        raise ValueError(f"{eqn.primitive.name}: layout {eqn.params['layout']}, not BTNH "
                         f"({_BTNH}), which is all jax.nn.dot_product_attention passes")
    (b, t, n, h_qk), (_, s, _, _), (*_, h_v) = (v.aval.shape for v in eqn.invars[:3])
    forward = 2.0 * b * n * t * s * (h_qk + h_v)
    return 2.0 * forward if backward else forward
