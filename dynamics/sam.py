"""The SAM perturbation and the logits-SAM transform: the one place this math lives.

SAM (Foret et al., 2021) evaluates the loss at an adversarially perturbed point

    e   = sg(rho * g / ||g||),   g = d/dθ L(θ),   e = 0 when ||g|| = 0     (Thm A.2 (3))
    out = L(θ + e)

and descends along d/dθ out: the first-order SAM gradient (no second-order term through
e, hence the stop-gradient). ``rho`` is signed: the theory pairs a negative learning
rate with a negative radius (paper §3.2, Cor 3.6), the practical DPO convention keeps
both positive (Table 4).

Logits-SAM (paper §3.3, Algorithm 1) applies the same perturbation to the output layer
W only. With trunk features ``h`` (..., d) and a loss of the head ``L(h, W)``:

    gW  = d/dW L(sg(h), W)
    e   = sg(rho * gW / ||gW||_F)
    out = L(h, W + e)

Gradients of ``out`` flow to W and, through h, to every trunk parameter: one trunk
forward and backward; under ``jit`` XLA shares the trunk between both uses of h. In the
fixed-feature toy the whole model is the output layer (h = φ), so SAM there *is*
logits-SAM and both halves of the project run this code.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def sum_of_squares(tree: PyTree) -> jax.Array:
    """Σ |x|² over every entry of every leaf, in float32 (or wider), in few GPU kernels.

    Summed leaf by leaf (``optax.tree.norm``'s way), XLA:GPU runs each large leaf's sum as
    two kernels: 711 for the 389 gradients of a 2.65B GPT-2, 2.7 ms a step on an H200 where
    their reads take about 1.2 ms. Here each matrix is summed along its last axis (a kernel
    a matrix), and those row sums with the vectors' squares are concatenated (a few
    kernels) and summed: 202 kernels there (compiled for the H200). The optimization
    barrier keeps XLA from rewriting the sum of the concatenation back into a sum per leaf.
    Sharded (FSDP), the concatenation gathers the row sums (a few MB at 2.65B) where a sum
    per leaf all-reduces one scalar a leaf.
    """
    parts = []
    for x in jax.tree_util.tree_leaves(tree):
        x = jnp.asarray(x)
        x = x.astype(jnp.result_type(jnp.float32, x))
        squares = jnp.square(jnp.abs(x)) if jnp.iscomplexobj(x) else jnp.square(x)
        parts.append(jnp.sum(squares, axis=-1).ravel() if x.ndim >= 2 else squares.ravel())
    if not parts:
        return jnp.float32(0)
    return jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(parts)))


def global_norm(tree: PyTree) -> jax.Array:
    """Frobenius norm over every leaf of ``tree`` (accumulated in float32 or wider).

    Computed as m·‖tree / m‖ with m the largest |entry|, so that squares neither flush to
    zero (‖g‖ ≲ 1e-19 in float32: a DPO batch whose every pair has βΔ ≳ 44) nor overflow:
    the SAM direction g/‖g‖ exists at any scale of g.
    """
    leaves = [x.astype(jnp.result_type(jnp.float32, x)) for x in jax.tree_util.tree_leaves(tree)]
    largest = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in leaves], jnp.float32(0))
    m = jnp.where(largest > 0, largest, 1.0)
    return m * jnp.sqrt(sum_of_squares([x / m for x in leaves]))


def sam_perturbation(grads: PyTree, rho: float | jax.Array) -> PyTree:
    """``rho * grads / ||grads||`` with the zero-gradient convention ``e = 0``.

    The norm is global over the whole pytree (and, for sharded arrays, over every
    device: ``jit`` inserts the all-reduce).
    """
    norm = global_norm(grads)
    safe = jnp.where(norm > 0, norm, 1.0)
    scale = jnp.where(norm > 0, rho / safe, 0.0)
    return jax.tree_util.tree_map(lambda g: (scale * g).astype(g.dtype), grads)


def sam_loss(
    loss_fn: Callable[..., Any],
    params: PyTree,
    rho: float | jax.Array,
    *args: Any,
    has_aux: bool = False,
    perturb: Callable[[jax.Array, jax.Array], Any] = jnp.add,
    reuse: Callable[[Any], dict[str, Any]] | None = None,
) -> Any:
    """The SAM objective ``loss_fn(params + e, *args)`` with ``e`` from the gradient at ``params``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)`` if ``has_aux``).
      params: the pytree that is perturbed.
      rho: signed radius.
      *args: further inputs; gradients of the result flow into them, but the inner
        gradient that sets ``e`` treats them as constants.
      has_aux: ``loss_fn`` returns ``(loss, aux)``. The returned aux is the one of the
        *unperturbed* evaluation (the metrics of the current model), computed by the
        inner gradient pass at no extra cost.
      perturb: ``perturb(leaf, e_leaf)``, what ``loss_fn`` gets for each leaf: the sum
        ``leaf + e_leaf`` by default. A caller whose ``loss_fn`` forms the sum itself,
        where it is used, can keep the two apart (``lm.objectives``: no stored W + e).
      reuse: with ``has_aux``, ``reuse(aux) -> kwargs``: what the perturbed evaluation
        ``loss_fn(params + e, *args, **kwargs)`` takes from the unperturbed one's aux
        (``lm.objectives``: each token's logsumexp, with which the perturbed output layer
        reads its logits once). Constants: no gradient flows through them.

    Returns:
      ``out`` (and ``aux``), whose gradient w.r.t. ``params`` and ``args`` is the SAM
      gradient.
    """
    if reuse is not None and not has_aux:
        raise ValueError("sam_loss: reuse reads the unperturbed evaluation's aux; "
                         "pass has_aux=True")
    frozen = jax.lax.stop_gradient((params, args))
    inner = jax.grad(lambda p: loss_fn(p, *frozen[1]), has_aux=has_aux)(frozen[0])
    grads, aux = inner if has_aux else (inner, None)
    e = jax.lax.stop_gradient(sam_perturbation(grads, rho))
    perturbed = jax.tree_util.tree_map(perturb, params, e)
    reused = {} if reuse is None else jax.lax.stop_gradient(reuse(aux))
    out = loss_fn(perturbed, *args, **reused)
    if has_aux:
        return out[0], aux
    return out


def logits_sam_loss(
    loss_fn: Callable[..., Any],
    hidden: PyTree,
    head: PyTree,
    rho: float | jax.Array,
    *args: Any,
    has_aux: bool = False,
    perturb: Callable[[jax.Array, jax.Array], Any] = jnp.add,
    reuse: Callable[[Any], dict[str, Any]] | None = None,
) -> Any:
    """The logits-SAM objective ``L(h, W + e)`` (paper §3.3, Algorithm 1).

    Args:
      loss_fn: ``loss_fn(hidden, head, *args) -> scalar`` (or ``(scalar, aux)``). Any
        loss of the logits ``hidden @ head.T``, computed however the caller likes
        (whole or chunk by chunk), with any leading batch/token axes in ``hidden``.
      hidden: final features h, e.g. (..., d); the output of the trunk, so gradients of
        the result reach the trunk parameters through it.
      head: the output layer W, e.g. (V, d) (or a pytree such as weight and bias).
      rho: signed radius; ``rho = 0`` gives the plain loss and its gradient.
      *args: further loss inputs (labels, masks, reference log-probs), constants of the
        inner gradient.
      has_aux, perturb, reuse: see :func:`sam_loss`.
    """
    return sam_loss(
        lambda w, h, *rest, **reused: loss_fn(h, w, *rest, **reused), head, rho, hidden, *args,
        has_aux=has_aux, perturb=perturb, reuse=reuse,
    )


def head_step(
    loss_fn: Callable[..., jax.Array],
    hidden: PyTree,
    head: PyTree,
    eta: float | jax.Array,
    rho: float | jax.Array,
    *args: Any,
) -> PyTree:
    """One signed (logits-)SAM step on the head: ``W ← W − η ∇_W L(h, W + e)``.

    ``rho = 0`` is plain gradient descent; both ``eta`` and ``rho`` may be negative (the
    theory's y⁻ objective is descent with η < 0, Table 4). With fixed features
    (``hidden = φ``) this is exactly the SAM update of Theorem A.2.
    """
    grads = jax.grad(lambda w: logits_sam_loss(loss_fn, hidden, w, rho, *args))(head)
    return jax.tree_util.tree_map(lambda w, g: w - eta * g, head, grads)
