"""GPU correctness check of cuDNN attention on padded batches, run first by gpu_session.sh.

    python benchmarks/gpu_check.py        (from the repository root)

For a sliding-window llama-tiny and gpt2-124m's blocks (two of them, with a smaller
vocabulary: the attention is what is checked, and a short program compiles in seconds on a
short GPU loan) under bf16, the logits-SAM gradient (split head) of a right-padded batch with attention ``"auto"`` (cuDNN on a GPU) against XLA's:
every gradient and every hidden state, padding slots included, must be finite, and the
gradients must agree to bf16 noise, leaf by leaf. The key projection's bias is the exception:
softmax is invariant to the score q·b_k that it adds to every key of a query, so its exact
gradient is zero and either side's is rounding noise; it must stay under 1% of the key
kernel's gradient instead. The device memory is filled with NaN and freed first,
so a kernel that leaves padding rows unwritten shows. Exit status: the number of failures.
On a CPU both sides are XLA's and the check is trivially met.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm import objectives
from lm.models import attention_for, builtin_config, forward_hidden, init_params

PAIRS, LENGTH = 4, 256
LENGTHS = np.array([[256, 37], [129, 200], [64, 5], [250, 251]])  # [pair, chosen/rejected]


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-30))


def main() -> int:
    mask = (np.arange(LENGTH)[None, None] < LENGTHS[..., None]).astype(np.int32)
    loss_mask = mask.copy()
    loss_mask[..., :3] = 0
    rng = np.random.default_rng(0)
    failures = 0
    for name, extra in (("llama-tiny", {"sliding_window": 48}),
                        ("gpt2-124m", {"num_layers": 2, "vocab_size": 4096})):
        base = builtin_config(name, dtype="bfloat16", **extra)
        ids = (rng.integers(1, base.vocab_size, mask.shape) * mask).astype(np.int32)
        batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}
        params = init_params(base, jax.random.key(0))
        junk = [jnp.full((64 << 20,), jnp.nan, jnp.float32) for _ in range(8)]
        jax.block_until_ready(junk)
        del junk
        results = {}
        for requested in ("xla", "auto"):
            cfg = dataclasses.replace(base, attention_impl=attention_for(
                requested, base, vmapped_backward=True))
            grad_fn = jax.jit(objectives.make_grad_fn(cfg, mode="logits-sam", head_dtype="split",
                                                      chunk_size=64))
            _, _, grads = grad_fn(params, batch, params)
            hidden = jax.jit(lambda p: forward_hidden(
                cfg, p, ids.reshape(-1, LENGTH), mask.reshape(-1, LENGTH), right_padded=True))(params)
            leaves = {jax.tree_util.keystr(path): g
                      for path, g in jax.tree_util.tree_leaves_with_path(grads)}
            results[requested] = (cfg.attention_impl, leaves, hidden)
        impl, grads, hidden = results["auto"]
        _, reference, _ = results["xla"]
        finite = all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads.values())
        finite_hidden = bool(np.isfinite(np.asarray(hidden, np.float32)).all())
        errors = {path: relative_error(g, reference[path]) for path, g in grads.items()
                  if not path.endswith("['k']['bias']")}
        worst = max(errors, key=errors.get)
        norm = {path: float(np.linalg.norm(np.asarray(g, np.float32)))
                for path, g in grads.items()}
        key_bias = max((norm[path] / norm[path.replace("['bias']", "['kernel']")]
                        for path in grads if path.endswith("['k']['bias']")), default=0.0)
        ok = finite and finite_hidden and errors[worst] < 5e-2 and key_bias < 1e-2
        print(f"{name}: attention {impl or 'xla'} vs xla: gradients finite {finite}, hidden "
              f"states finite {finite_hidden}, largest relative gradient difference "
              f"{errors[worst]:.2e} ({worst}), key bias / key kernel gradient {key_bias:.1e}"
              f" -> {'ok' if ok else 'FAILED'}", flush=True)
        failures += not ok
    return failures


if __name__ == "__main__":
    sys.exit(main())
