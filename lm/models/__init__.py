"""Flax decoder LMs (GPT-2, GPT-NeoX/Pythia, Llama/Mistral) as pure functions of params.

    cfg = builtin_config("gpt2-tiny")        # or config_from_hf(json.load(...))
    params = init_params(cfg, jax.random.key(0))
    hidden = forward_hidden(cfg, params, ids, mask)    # [B, T, d], after the final norm
    W = output_head(cfg, params)                        # [V, d]
    z = logits(cfg, params, ids, mask)                  # hidden @ W.T, float32
"""

from lm.models.config import (BUILTIN_NAMES, REMAT_POLICIES, ConfigError, ModelConfig,
                              attention_for, builtin_config, config_from_hf, config_to_hf,
                              is_cudnn_attention_error)
from lm.models.decoder import (Decoder, abstract_params, forward_cached, forward_hidden,
                               head_cotangent, hidden_cotangent, init_cache, init_params, logits,
                               logits_from_hidden, matmul_precision, matrices_in, output_head,
                               position_ids, stacked_layers)

__all__ = [
    "BUILTIN_NAMES", "REMAT_POLICIES", "ConfigError", "Decoder", "ModelConfig", "abstract_params", "attention_for",
    "builtin_config", "config_from_hf", "config_to_hf", "forward_cached", "forward_hidden",
    "head_cotangent", "hidden_cotangent", "init_cache", "is_cudnn_attention_error",
    "init_params", "logits", "logits_from_hidden", "matmul_precision", "matrices_in", "output_head",
    "position_ids", "stacked_layers",
]
