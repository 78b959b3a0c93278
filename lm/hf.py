"""Hugging Face checkpoints in and out: local directories, safetensors only.

``load_pretrained(dir)`` reads ``config.json`` and ``model.safetensors`` (or the shards
listed in ``model.safetensors.index.json``) into ``(ModelConfig, params)``;
``save_pretrained(cfg, params, dir)`` writes the same layout so
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads it. Pickled ``.bin``
checkpoints are refused, never unpickled.

Layout conversions (ours <- HF): Linear weights [out, in] are transposed to flax
kernels [in, out]; GPT-2 Conv1D weights are already [in, out]. Fused projections are
split: GPT-2 ``c_attn`` is [d, q|k|v]; GPT-NeoX ``query_key_value`` interleaves per head,
output features laid out [heads, (q, k, v), head_dim]. Output layers stay [V, d].
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import safetensors
import safetensors.numpy

from lm.models import ConfigError, ModelConfig, config_from_hf, config_to_hf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-parameter buffers older exports carry; safe to skip.
_HARMLESS = re.compile(r"(\.attn\.(bias|masked_bias)|\.attention\.(bias|masked_bias)"
                       r"|rotary_emb\.inv_freq)$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names file and tensor."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, refusing pickled ones: ``model.safetensors``
    where there is one (as transformers decides), else the shards of the index."""
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    if (directory / INDEX_FILE).exists():
        index = _read_json(directory / INDEX_FILE)
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{directory / INDEX_FILE}: no 'weight_map' object")
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise CheckpointError(f"{directory / missing[0]}: shard listed in {INDEX_FILE} "
                                  "is missing")
        return [directory / f for f in files]
    pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(
        p.name for p in directory.glob("*.pt*"))
    if pickled:
        raise CheckpointError(
            f"{directory / pickled[0]}: pickled PyTorch checkpoint refused (unpickling runs "
            "arbitrary code); convert it to safetensors first")
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


class _Tensors:
    """Every tensor of a checkpoint, fetched by name with shape checks; tracks unused ones."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        self._handles = {}
        for path in files:
            try:
                handle = safetensors.safe_open(str(path), framework="np")
                names = list(handle.keys())
            except Exception as e:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                      f"({e})") from None
            self._handles[path] = handle
            for name in names:
                self._where[name] = path
        self.unused = set(self._where)

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._where:
            raise CheckpointError(f"{self._describe()}: missing tensor {name!r}")
        path = self._where[name]
        try:
            array = self._handles[path].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from None
        if tuple(array.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(array.shape)}, "
                                  f"expected {tuple(shape)}")
        self.unused.discard(name)
        return array

    def _describe(self) -> str:
        files = sorted({p.name for p in self._handles})
        parent = next(iter(self._handles)).parent if self._handles else Path(".")
        return str(parent / files[0]) if len(files) == 1 else f"{parent}/{{{','.join(files)}}}"


# --- family mappings: one (import, export) pair each ------------------------------------


def _prefix(names: list[str], prefix: str) -> str:
    return prefix if any(n.startswith(prefix) for n in names) else ""


def _norm_in(t: _Tensors, name: str, d: int, bias: bool) -> dict:
    out = {"scale": t.get(f"{name}.weight", (d,))}
    if bias:
        out["bias"] = t.get(f"{name}.bias", (d,))
    return out


def _norm_out(out: dict, name: str, p: dict) -> None:
    out[f"{name}.weight"] = p["scale"]
    if "bias" in p:
        out[f"{name}.bias"] = p["bias"]


def _linear_in(t: _Tensors, name: str, n_in: int, n_out: int, bias: bool) -> dict:
    """nn.Linear weight [out, in] -> flax kernel [in, out]."""
    out = {"kernel": t.get(f"{name}.weight", (n_out, n_in)).T}
    if bias:
        out["bias"] = t.get(f"{name}.bias", (n_out,))
    return out


def _linear_out(out: dict, name: str, p: dict) -> None:
    out[f"{name}.weight"] = p["kernel"].T
    if "bias" in p:
        out[f"{name}.bias"] = p["bias"]


def _gpt2_in(cfg: ModelConfig, t: _Tensors) -> dict:
    pre = _prefix(t.names(), "transformer.")
    d, inner = cfg.hidden_size, cfg.intermediate_size
    params = {"embed": {"embedding": t.get(f"{pre}wte.weight", (cfg.vocab_size, d))},
              "pos_embed": {"embedding": t.get(f"{pre}wpe.weight",
                                               (cfg.max_position_embeddings, d))},
              "final_norm": _norm_in(t, f"{pre}ln_f", d, True)}
    for i in range(cfg.num_layers):
        h = f"{pre}h.{i}"
        w, b = t.get(f"{h}.attn.c_attn.weight", (d, 3 * d)), t.get(f"{h}.attn.c_attn.bias",
                                                                    (3 * d,))
        conv = lambda name, n_in, n_out: {"kernel": t.get(f"{name}.weight", (n_in, n_out)),
                                          "bias": t.get(f"{name}.bias", (n_out,))}
        params[f"layers_{i}"] = {
            "attn_norm": _norm_in(t, f"{h}.ln_1", d, True),
            "mlp_norm": _norm_in(t, f"{h}.ln_2", d, True),
            "attn": {**{k: {"kernel": w[:, j * d:(j + 1) * d], "bias": b[j * d:(j + 1) * d]}
                        for j, k in enumerate("qkv")},
                     "o": conv(f"{h}.attn.c_proj", d, d)},
            "mlp": {"fc_in": conv(f"{h}.mlp.c_fc", d, inner),
                    "fc_out": conv(f"{h}.mlp.c_proj", inner, d)},
        }
    if cfg.tie_word_embeddings:
        t.unused.discard("lm_head.weight")
    else:
        params["lm_head"] = t.get("lm_head.weight", (cfg.vocab_size, d))
    return params


def _gpt2_out(cfg: ModelConfig, params: dict) -> dict:
    out = {"transformer.wte.weight": params["embed"]["embedding"],
           "transformer.wpe.weight": params["pos_embed"]["embedding"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"]
    _norm_out(out, "transformer.ln_f", params["final_norm"])
    for i in range(cfg.num_layers):
        h, p = f"transformer.h.{i}", params[f"layers_{i}"]
        a = p["attn"]
        out[f"{h}.attn.c_attn.weight"] = np.concatenate([a[k]["kernel"] for k in "qkv"], 1)
        out[f"{h}.attn.c_attn.bias"] = np.concatenate([a[k]["bias"] for k in "qkv"])
        for name, q in ((f"{h}.attn.c_proj", a["o"]), (f"{h}.mlp.c_fc", p["mlp"]["fc_in"]),
                        (f"{h}.mlp.c_proj", p["mlp"]["fc_out"])):
            out[f"{name}.weight"], out[f"{name}.bias"] = q["kernel"], q["bias"]
        _norm_out(out, f"{h}.ln_1", p["attn_norm"])
        _norm_out(out, f"{h}.ln_2", p["mlp_norm"])
    return out


def _neox_in(cfg: ModelConfig, t: _Tensors) -> dict:
    pre = _prefix(t.names(), "gpt_neox.")
    d, inner, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    bias = cfg.attention_bias
    params = {"embed": {"embedding": t.get(f"{pre}embed_in.weight", (cfg.vocab_size, d))},
              "final_norm": _norm_in(t, f"{pre}final_layer_norm", d, True)}
    if cfg.tie_word_embeddings:
        t.unused.discard("embed_out.weight")
    else:
        params["lm_head"] = t.get("embed_out.weight", (cfg.vocab_size, d))
    for i in range(cfg.num_layers):
        lay = f"{pre}layers.{i}"
        w = t.get(f"{lay}.attention.query_key_value.weight", (3 * d, d)).reshape(n, 3, h, d)
        attn = {k: {"kernel": w[:, j].reshape(n * h, d).T} for j, k in enumerate("qkv")}
        if bias:
            b = t.get(f"{lay}.attention.query_key_value.bias", (3 * d,)).reshape(n, 3, h)
            for j, k in enumerate("qkv"):
                attn[k]["bias"] = b[:, j].reshape(n * h)
        attn["o"] = _linear_in(t, f"{lay}.attention.dense", d, d, bias)
        params[f"layers_{i}"] = {
            "attn_norm": _norm_in(t, f"{lay}.input_layernorm", d, True),
            "mlp_norm": _norm_in(t, f"{lay}.post_attention_layernorm", d, True),
            "attn": attn,
            "mlp": {"fc_in": _linear_in(t, f"{lay}.mlp.dense_h_to_4h", d, inner, True),
                    "fc_out": _linear_in(t, f"{lay}.mlp.dense_4h_to_h", inner, d, True)},
        }
    return params


def _neox_out(cfg: ModelConfig, params: dict) -> dict:
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    out = {"gpt_neox.embed_in.weight": params["embed"]["embedding"]}
    if not cfg.tie_word_embeddings:
        out["embed_out.weight"] = params["lm_head"]
    _norm_out(out, "gpt_neox.final_layer_norm", params["final_norm"])
    for i in range(cfg.num_layers):
        lay, p = f"gpt_neox.layers.{i}", params[f"layers_{i}"]
        a = p["attn"]
        w = np.stack([a[k]["kernel"].T.reshape(n, h, d) for k in "qkv"], axis=1)
        out[f"{lay}.attention.query_key_value.weight"] = w.reshape(3 * d, d)
        if "bias" in a["q"]:
            b = np.stack([a[k]["bias"].reshape(n, h) for k in "qkv"], axis=1)
            out[f"{lay}.attention.query_key_value.bias"] = b.reshape(3 * d)
        _linear_out(out, f"{lay}.attention.dense", a["o"])
        _linear_out(out, f"{lay}.mlp.dense_h_to_4h", p["mlp"]["fc_in"])
        _linear_out(out, f"{lay}.mlp.dense_4h_to_h", p["mlp"]["fc_out"])
        _norm_out(out, f"{lay}.input_layernorm", p["attn_norm"])
        _norm_out(out, f"{lay}.post_attention_layernorm", p["mlp_norm"])
    return out


def _llama_in(cfg: ModelConfig, t: _Tensors) -> dict:
    pre = _prefix(t.names(), "model.")
    d, inner = cfg.hidden_size, cfg.intermediate_size
    qd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    ab, mb = cfg.attention_bias, cfg.mlp_bias
    params = {"embed": {"embedding": t.get(f"{pre}embed_tokens.weight", (cfg.vocab_size, d))},
              "final_norm": _norm_in(t, f"{pre}norm", d, False)}
    if cfg.tie_word_embeddings:
        t.unused.discard("lm_head.weight")
    else:
        params["lm_head"] = t.get("lm_head.weight", (cfg.vocab_size, d))
    for i in range(cfg.num_layers):
        lay = f"{pre}layers.{i}"
        params[f"layers_{i}"] = {
            "attn_norm": _norm_in(t, f"{lay}.input_layernorm", d, False),
            "mlp_norm": _norm_in(t, f"{lay}.post_attention_layernorm", d, False),
            "attn": {"q": _linear_in(t, f"{lay}.self_attn.q_proj", d, qd, ab),
                     "k": _linear_in(t, f"{lay}.self_attn.k_proj", d, kd, ab),
                     "v": _linear_in(t, f"{lay}.self_attn.v_proj", d, kd, ab),
                     "o": _linear_in(t, f"{lay}.self_attn.o_proj", qd, d, ab)},
            "mlp": {"gate": _linear_in(t, f"{lay}.mlp.gate_proj", d, inner, mb),
                    "up": _linear_in(t, f"{lay}.mlp.up_proj", d, inner, mb),
                    "down": _linear_in(t, f"{lay}.mlp.down_proj", inner, d, mb)},
        }
    return params


def _llama_out(cfg: ModelConfig, params: dict) -> dict:
    out = {"model.embed_tokens.weight": params["embed"]["embedding"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = params["lm_head"]
    _norm_out(out, "model.norm", params["final_norm"])
    for i in range(cfg.num_layers):
        lay, p = f"model.layers.{i}", params[f"layers_{i}"]
        for k in "qkvo":
            _linear_out(out, f"{lay}.self_attn.{k}_proj", p["attn"][k])
        for k in ("gate", "up", "down"):
            _linear_out(out, f"{lay}.mlp.{k}_proj", p["mlp"][k])
        _norm_out(out, f"{lay}.input_layernorm", p["attn_norm"])
        _norm_out(out, f"{lay}.post_attention_layernorm", p["mlp_norm"])
    return out


_FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "gpt2": (_gpt2_in, _gpt2_out),
    "gpt_neox": (_neox_in, _neox_out),
    "llama": (_llama_in, _llama_out),
}


# --- public API ---------------------------------------------------------------------------


def load_config(directory: str | os.PathLike, **overrides) -> ModelConfig:
    """``config.json`` of a checkpoint directory as a ModelConfig (CheckpointError if bad)."""
    path = Path(directory) / "config.json"
    hf = _read_json(path)
    try:
        return config_from_hf(hf, **overrides)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r}") from None


def load_pretrained(directory: str | os.PathLike, *, dtype: Any = "float32",
                    param_dtype: Any = "float32") -> tuple[ModelConfig, dict]:
    """Read a local HF checkpoint into ``(cfg, params)`` (numpy arrays in ``param_dtype``).

    Every tensor must be consumed (apart from known buffers such as GPT-2's causal
    ``attn.bias``), every expected tensor present with the expected shape; otherwise a
    CheckpointError names the file and tensor.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_config(directory, dtype=dtype, param_dtype=param_dtype)
    tensors = _Tensors(_weight_files(directory))
    params = _FAMILIES[cfg.family][0](cfg, tensors)
    unexpected = sorted(n for n in tensors.unused if not _HARMLESS.search(n))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{tensors._where[unexpected[0]]}: unexpected tensor "
                              f"{unexpected[0]!r}{more} for model_type {cfg.model_type!r}")
    cast = np.dtype(cfg.params_dtype)
    return cfg, jax.tree_util.tree_map(lambda x: np.ascontiguousarray(x, dtype=cast), params)


def hf_state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """``params`` as HF tensor names -> numpy arrays (contiguous, in their own dtype)."""
    host = jax.tree_util.tree_map(np.asarray, params)
    return {k: np.ascontiguousarray(v) for k, v in _FAMILIES[cfg.family][1](cfg, host).items()}


def save_pretrained(cfg: ModelConfig, params: dict, directory: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` in the HF layout.

    A tied head is written once (as the embedding), as transformers expects. Each file is
    written beside its final name and renamed over it, so an interrupted save leaves the
    previous file whole (and a model loaded from this folder, still being read, intact);
    a sharded checkpoint the folder held before (index and shards) is removed afterwards,
    since loaders would otherwise have two sets of weights to choose from.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(cfg)
    tensors = hf_state_dict(cfg, params)
    weights, config = directory / SINGLE_FILE, directory / "config.json"
    safetensors.numpy.save_file(tensors, str(_partial(weights)), metadata={"format": "pt"})
    _partial(config).write_text(json.dumps(hf_config, indent=2) + "\n")
    os.replace(_partial(weights), weights)
    os.replace(_partial(config), config)
    _remove_shards(directory)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _remove_shards(directory: Path) -> None:
    """Delete a sharded checkpoint's index and the shards it lists."""
    index = directory / INDEX_FILE
    if not index.exists():
        return
    try:
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (ValueError, AttributeError):
        shards = set()
    index.unlink()
    for shard in shards - {SINGLE_FILE}:
        if isinstance(shard, str) and Path(shard).name == shard:  # in this folder only
            (directory / shard).unlink(missing_ok=True)
