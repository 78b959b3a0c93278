"""Model configuration: one frozen, hashable dataclass for every decoder family.

The config is a static argument of every jitted function (hashable, compared by value),
so it holds only Python scalars, strings and tuples. Three families share one decoder
(`lm.models.decoder`); they differ only in the fields below:

=========  ==============  =========  ===========  =========  ===========================
family     HF model_type   norm       positions    MLP        attention
=========  ==============  =========  ===========  =========  ===========================
gpt2       gpt2            LayerNorm  learned      GELU       MHA, tied head
gpt_neox   gpt_neox        LayerNorm  RoPE (pct)   GELU       MHA, parallel residual opt.
llama      llama, mistral  RMSNorm    RoPE         SwiGLU     GQA, sliding window opt.
=========  ==============  =========  ===========  =========  ===========================
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax.numpy as jnp

FAMILIES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama"}
ROPE_TYPES = ("default", "linear", "llama3")
#: The rope_scaling keys each type reads (lm.models.layers.rope_frequencies).
ROPE_KEYS = {"default": (), "linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings")}
#: Fields that are numerics or implementation choices, not architecture: no config.json holds them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl", "remat_policy", "scan_layers")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "silu", "relu")
ATTENTION_IMPLS = (None, "xla", "cudnn")
# What a rematerialised block keeps for the backward pass (``jax.checkpoint_policies``):
# nothing but its input (the default, None), or every matmul output besides, or only the
# matmuls without batch dimensions (the projections and the MLP: attention's score and
# value products, which have a batch dimension, are recomputed).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


class ConfigError(ValueError):
    """A config.json / ModelConfig this package cannot build a model from."""


def attention_for(requested: str, cfg: "ModelConfig", *, vmapped_backward: bool = False,
                  device: Any = None) -> str | None:
    """``attention_impl`` for an ``--attention`` flag (auto | xla | cudnn) and model ``cfg``.

    "auto" picks cuDNN's flash attention where it runs, XLA's elsewhere: an NVIDIA GPU,
    16-bit compute, a head dim that is a multiple of 8 up to 128 (256 on Hopper) and, when
    the trunk's backward pass is vmapped (logits-SAM's split head), jax 0.11 or later
    (0.10's cuDNN backward cannot be batched). "cudnn" where it cannot run is a
    :class:`ConfigError` that says why. ``device``: the one it runs on (default: this
    host's first; a compile-only GPU, ``experiments.bench --target``).
    """
    if requested not in ("auto", "xla", "cudnn"):
        raise ConfigError(f"--attention: unknown implementation {requested!r} (auto, xla, cudnn)")
    if requested == "xla":
        return "xla"
    unfit = _cudnn_unfit(cfg, vmapped_backward, device)
    if requested == "cudnn" and unfit:
        raise ConfigError(f"--attention cudnn: {unfit}; use --attention auto or xla")
    return None if unfit else "cudnn"


# What an error from cuDNN's attention names: jax's cuDNN checks and lowering, XLA's
# fused-attention rewrite and cuDNN's own status codes.
_CUDNN_ATTENTION_ERROR = re.compile(r"cudnn|fmha|fused.?attention|dot_product_attention",
                                    re.IGNORECASE)


def is_cudnn_attention_error(err: BaseException) -> bool:
    """Whether ``err`` (from tracing, compiling or running a step) names cuDNN's attention:
    where "auto" chose cuDNN, XLA's attention is the way round it."""
    return bool(_CUDNN_ATTENTION_ERROR.search(f"{type(err).__name__}: {err}"))


def _cudnn_unfit(cfg: "ModelConfig", vmapped_backward: bool, device: Any) -> str | None:
    """Why cuDNN's fused attention cannot run ``cfg`` on ``device`` (None: here), or None."""
    import jax

    device = jax.devices()[0] if device is None else device
    platform_version = getattr(getattr(device, "client", None), "platform_version", "")
    if device.platform != "gpu" or "rocm" in platform_version.lower():
        return "cuDNN needs an NVIDIA GPU"
    if jnp.finfo(cfg.compute_dtype).bits != 16:
        return f"cuDNN takes 16-bit compute only, not {cfg.dtype} (--dtype bfloat16)"
    hopper = float(getattr(device, "compute_capability", "0")) >= 9.0
    if cfg.head_dim % 8 or cfg.head_dim > (256 if hopper else 128):
        return f"cuDNN cannot take head dim {cfg.head_dim} on this GPU"
    if vmapped_backward and jax.__version_info__ < (0, 11):
        return (f"jax {jax.__version__} cannot vmap cuDNN's backward pass, which the split "
                f"head does (jax >= 0.11 can)")
    return None


def _dtype_name(d: Any) -> str:
    return jnp.dtype(d).name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    ``dtype`` is the compute dtype (activations, matmul inputs); ``param_dtype`` the
    storage dtype of ``init_params``/``load_pretrained``. Both accept anything
    ``jnp.dtype`` does and are normalised to their names (``"float32"``,
    ``"bfloat16"``) so the config stays hashable.

    ``rotary_dim`` is the number of leading head dims that RoPE rotates (``head_dim``
    for Llama, ``int(head_dim * rotary_pct)`` for GPT-NeoX, 0 for GPT-2).
    ``rope_scaling`` is a sorted tuple of ``(key, value)`` pairs from HF's
    ``rope_scaling`` dict (``rope_type`` "linear" or "llama3"), or None.
    ``sliding_window``: a query attends to keys ``k`` with ``q - window < k <= q``
    (Mistral), or to every earlier key when None.
    ``attention_impl`` is passed to ``jax.nn.dot_product_attention`` (None: XLA picks;
    "cudnn" on GPU). ``remat_policy`` names a ``jax.checkpoint_policies`` member used when
    ``forward_hidden(..., remat=True)`` (None: save nothing inside a block).
    ``scan_layers`` runs ``forward_hidden``'s blocks as one ``lax.scan`` over their stacked
    parameters: compile time independent of depth; params keep one subtree per layer.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    activation: str = "gelu_new"
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    parallel_residual: bool = False
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    attention_impl: str | None = None
    remat_policy: str | None = None
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if self.model_type not in FAMILIES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r} (supported: {sorted(FAMILIES)})")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unsupported activation {self.activation!r} ({ACTIVATIONS})")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                              f"got {self.attention_impl!r}")
        if self.remat_policy not in (None, *REMAT_POLICIES):
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES} or None, "
                              f"got {self.remat_policy!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and in "
                              f"[0, head_dim={self.head_dim}]")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope_scaling type {self.rope_type!r} "
                              f"(supported: {ROPE_TYPES})")
        missing = [k for k in ROPE_KEYS[self.rope_type] if k not in dict(self.rope_scaling or ())]
        if missing:
            raise ConfigError(f"rope_scaling of type {self.rope_type!r} lacks {missing[0]!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        d = dict(self.rope_scaling)
        return d.get("rope_type", d.get("type", "default"))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """EOS token ids as a tuple (HF allows one id or a list)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)


def _freeze(d: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if not d:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def _rope(hf: Mapping[str, Any], theta_key: str, default_theta: float):
    """(theta, scaling) from either the classic keys or transformers-5 ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    theta = hf.get(theta_key, params.get("rope_theta", default_theta))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(theta), _freeze(scaling)


def config_from_hf(hf: Mapping[str, Any], **overrides) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face ``config.json`` dict.

    ``overrides`` (e.g. ``dtype="bfloat16"``) replace fields after conversion.
    Raises ConfigError naming the offending key for unsupported settings.
    """
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"unsupported model_type {model_type!r} "
                          f"(supported: {sorted(FAMILIES)})")
    tokens = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  pad_token_id=hf.get("pad_token_id"))
    if model_type == "gpt2":
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ConfigError(f"config key {key}=true is not supported")
        if not hf.get("scale_attn_weights", True):
            raise ConfigError("config key scale_attn_weights=false is not supported")
        d, heads = hf["n_embd"], hf["n_head"]
        cfg = ModelConfig(
            model_type="gpt2", vocab_size=hf["vocab_size"], hidden_size=d,
            num_layers=hf["n_layer"], num_heads=heads, num_kv_heads=heads,
            head_dim=d // heads, intermediate_size=hf.get("n_inner") or 4 * d,
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            activation=hf.get("activation_function", "gelu_new"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True), **tokens)
    elif model_type == "gpt_neox":
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = d // heads
        theta, scaling = _rope(hf, "rotary_emb_base", 10000.0)
        params = hf.get("rope_parameters") or {}
        pct = hf.get("rotary_pct", params.get("partial_rotary_factor", 0.25))  # transformers' default
        cfg = ModelConfig(
            model_type="gpt_neox", vocab_size=hf["vocab_size"], hidden_size=d,
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
            head_dim=head_dim, intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            norm_eps=hf.get("layer_norm_eps", 1e-5), activation=hf.get("hidden_act", "gelu"),
            rotary_dim=int(head_dim * pct), rope_theta=theta, rope_scaling=scaling,
            parallel_residual=hf.get("use_parallel_residual", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", True), **tokens)
    else:
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or d // heads
        theta, scaling = _rope(hf, "rope_theta", 10000.0)
        cfg = ModelConfig(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=d,
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
            rotary_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            sliding_window=hf.get("sliding_window", 4096) if model_type == "mistral" else None,
            **tokens)
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict transformers needs to rebuild ``cfg``'s architecture."""
    eos = cfg.eos_token_id
    tokens = dict(bos_token_id=cfg.bos_token_id,
                  eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
                  pad_token_id=cfg.pad_token_id)
    torch_dtype = cfg.param_dtype
    if cfg.family == "gpt2":
        out = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2",
                   vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                   n_head=cfg.num_heads, n_inner=cfg.intermediate_size,
                   n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
                   activation_function=cfg.activation, tie_word_embeddings=cfg.tie_word_embeddings,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif cfg.family == "gpt_neox":
        out = dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox",
                   vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   intermediate_size=cfg.intermediate_size,
                   max_position_embeddings=cfg.max_position_embeddings,
                   layer_norm_eps=cfg.norm_eps, hidden_act=cfg.activation,
                   rotary_pct=_rotary_pct(cfg.rotary_dim, cfg.head_dim), rotary_emb_base=cfg.rope_theta,
                   rope_theta=cfg.rope_theta, use_parallel_residual=cfg.parallel_residual,
                   tie_word_embeddings=cfg.tie_word_embeddings,
                   attention_bias=cfg.attention_bias, hidden_dropout=0.0,
                   attention_dropout=0.0)
    else:
        arch = "MistralForCausalLM" if cfg.model_type == "mistral" else "LlamaForCausalLM"
        out = dict(architectures=[arch], model_type=cfg.model_type,
                   vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                   num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.intermediate_size,
                   max_position_embeddings=cfg.max_position_embeddings,
                   rms_norm_eps=cfg.norm_eps, hidden_act=cfg.activation,
                   rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
                   attention_bias=cfg.attention_bias)
        if cfg.model_type == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        else:
            out["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {k: list(v) if isinstance(v, tuple) else v
                               for k, v in cfg.rope_scaling}
    out.update(tokens, torch_dtype=torch_dtype)
    back = config_from_hf(out)
    lost = [f.name for f in dataclasses.fields(cfg) if f.name not in RUNTIME_FIELDS
            and getattr(back, f.name) != getattr(cfg, f.name)]
    if lost:
        raise ConfigError(f"a {cfg.model_type} config.json cannot express "
                          + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in lost))
    return out


def _rotary_pct(rotary_dim: int, head_dim: int) -> float:
    """rotary_dim / head_dim, nudged up until ``int(head_dim * pct)`` (how transformers
    and :func:`config_from_hf` read it back) gives rotary_dim again."""
    pct = rotary_dim / head_dim
    while int(head_dim * pct) < rotary_dim:
        pct = math.nextafter(pct, math.inf)
    return pct


def _gpt2(layers, d, heads, vocab=50257, ctx=1024):
    return ModelConfig(model_type="gpt2", vocab_size=vocab, hidden_size=d, num_layers=layers,
                       num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                       intermediate_size=4 * d, max_position_embeddings=ctx,
                       bos_token_id=vocab - 1, eos_token_id=vocab - 1)


def _neox(layers, d, heads, vocab=50304, ctx=2048):
    return ModelConfig(model_type="gpt_neox", vocab_size=vocab, hidden_size=d,
                       num_layers=layers, num_heads=heads, num_kv_heads=heads,
                       head_dim=d // heads, intermediate_size=4 * d,
                       max_position_embeddings=ctx, activation="gelu",
                       rotary_dim=(d // heads) // 4, parallel_residual=True,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


_BUILTINS = {
    "gpt2-tiny": lambda: _gpt2(2, 64, 4, vocab=512, ctx=128),
    "gpt2-124m": lambda: _gpt2(12, 768, 12),
    "gpt2-medium": lambda: _gpt2(24, 1024, 16),
    "gpt2-large": lambda: _gpt2(36, 1280, 20),
    "gpt2-2.65b": lambda: _gpt2(32, 2560, 32),
    "pythia-tiny": lambda: _neox(2, 64, 4, vocab=512, ctx=128),
    "pythia-2.8b": lambda: _neox(32, 2560, 32),
    "llama-tiny": lambda: ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
        norm_eps=1e-6, activation="silu", rotary_dim=16, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2),
    "mistral-7b": lambda: ModelConfig(
        model_type="mistral", vocab_size=32000, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
        max_position_embeddings=32768, norm_eps=1e-5, activation="silu", rotary_dim=128,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        sliding_window=4096, bos_token_id=1, eos_token_id=2),
}

BUILTIN_NAMES = tuple(_BUILTINS)


def builtin_config(name: str, **overrides) -> ModelConfig:
    """A named architecture (random init; no weights): one of ``BUILTIN_NAMES``."""
    if name not in _BUILTINS:
        raise ConfigError(f"unknown built-in model {name!r} (known: {', '.join(_BUILTINS)})")
    cfg = _BUILTINS[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
