"""lm.hf: logit parity with transformers (committed fixtures), export, sharding, errors."""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from lm import hf
from lm.hf import CheckpointError, load_pretrained, save_pretrained
from lm.models import logits

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
MODELS = ["gpt2", "neox_parallel", "neox_sequential", "llama_gqa", "llama_tied",
          "mistral_window"]
fwd_logits = jax.jit(logits, static_argnums=0)


def _copy(name, tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def _tensors(directory: Path) -> dict:
    return safetensors.numpy.load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name):
    cfg, params = load_pretrained(FIXTURES / name)
    ref = np.load(FIXTURES / name / "inputs.npz")
    z = np.asarray(fwd_logits(cfg, params, ref["input_ids"], ref["attention_mask"]))
    real = ref["attention_mask"] == 1
    assert np.abs(z - ref["logits"])[real].max() <= 1e-4
    # Row 1 is right-padded, row 2 the same tokens left-padded.
    np.testing.assert_allclose(z[1, :9], z[2, 3:], atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "neox_parallel", "llama_gqa", "llama_tied"])
def test_export_reproduces_hf_layout_and_reloads(name, tmp_path):
    cfg, params = load_pretrained(FIXTURES / name)
    save_pretrained(cfg, params, tmp_path / "out")
    ours, theirs = _tensors(tmp_path / "out"), _tensors(FIXTURES / name)
    if cfg.tie_word_embeddings:  # transformers may store the tied head twice
        theirs.pop("lm_head.weight", None)
    assert set(ours) == set(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    cfg2, params2 = load_pretrained(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    d = _copy("llama_gqa", tmp_path)
    tensors = _tensors(d)
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        safetensors.numpy.save_file({k: tensors[k] for k in keys}, str(d / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, sharded = load_pretrained(d)
    _, single = load_pretrained(FIXTURES / "llama_gqa")
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, single)


def test_bfloat16_params(tmp_path):
    cfg, params = load_pretrained(FIXTURES / "gpt2", dtype="bfloat16", param_dtype="bfloat16")
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(params)} == {"bfloat16"}
    save_pretrained(cfg, params, tmp_path / "bf16")
    assert _tensors(tmp_path / "bf16")["transformer.wte.weight"].dtype.name == "bfloat16"


def test_harmless_buffers_are_ignored(tmp_path):
    d = _copy("gpt2", tmp_path)
    tensors = _tensors(d)
    tensors["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
    load_pretrained(d)


def _edit(tmp_path, name, fn) -> Path:
    d = _copy(name, tmp_path)
    tensors = _tensors(d)
    fn(tensors)
    safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
    return d


def test_missing_tensor(tmp_path):
    d = _edit(tmp_path, "llama_gqa", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor "
                                              r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_pretrained(d)


def test_unexpected_tensor(tmp_path):
    d = _edit(tmp_path, "neox_parallel",
              lambda t: t.__setitem__("gpt_neox.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'gpt_neox.extra.weight'"):
        load_pretrained(d)


def test_wrong_shape(tmp_path):
    key = "transformer.h.0.attn.c_attn.weight"
    d = _edit(tmp_path, "gpt2", lambda t: t.__setitem__(key, t[key].T.copy()))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' has shape \(96, 32\), "
                                              r"expected \(32, 96\)"):
        load_pretrained(d)


def test_truncated_file(tmp_path):
    d = _copy("gpt2", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_pretrained(d)


def test_bin_only_checkpoint_is_refused_unread(tmp_path):
    d = _copy("gpt2", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickled PyTorch checkpoint "
                                              "refused"):
        load_pretrained(d)


def test_unsupported_model_type(tmp_path):
    d = _copy("gpt2", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "t5"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 't5'"):
        load_pretrained(d)


def test_missing_config_and_missing_shard(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_pretrained(tmp_path)
    d = _copy("gpt2", tmp_path)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    load_pretrained(d)  # model.safetensors wins over an index, as in transformers
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: shard listed"):
        load_pretrained(d)


def test_error_messages_are_one_line(tmp_path):
    d = _edit(tmp_path, "llama_tied", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(d)
    assert "\n" not in str(info.value) and hf.SINGLE_FILE in str(info.value)


def test_untied_gpt2_round_trips(tmp_path):
    cfg, params = load_pretrained(FIXTURES / "gpt2")
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    params = {**params, "lm_head": params["embed"]["embedding"][::-1].copy()}
    save_pretrained(untied, params, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    cfg2, params2 = load_pretrained(tmp_path / "out")
    assert cfg2 == untied
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_tied_neox_ignores_a_stored_copy_of_the_head(tmp_path):
    d = _copy("neox_parallel", tmp_path)
    config = json.loads((d / "config.json").read_text())
    tensors = _tensors(d)
    tensors["embed_out.weight"] = tensors["gpt_neox.embed_in.weight"]
    safetensors.numpy.save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    cfg, params = load_pretrained(d)
    assert cfg.tie_word_embeddings and "lm_head" not in params


def test_saving_over_a_sharded_checkpoint_replaces_it(tmp_path):
    """A folder that held a sharded checkpoint loads what was saved into it last, and no
    stale shard or temporary file is left behind."""
    d = _copy("llama_gqa", tmp_path)
    tensors = _tensors(d)
    (d / "model.safetensors").unlink()
    shard = "model-00001-of-00001.safetensors"
    safetensors.numpy.save_file(tensors, str(d / shard))
    (d / hf.INDEX_FILE).write_text(json.dumps({"weight_map": {k: shard for k in tensors}}))
    cfg, params = load_pretrained(d)
    ones = jax.tree_util.tree_map(np.ones_like, params)
    save_pretrained(cfg, ones, d)
    assert sorted(p.name for p in d.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    _, reloaded = load_pretrained(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, ones)


def test_settings_a_config_json_cannot_hold_are_refused_on_save(tmp_path):
    from lm.models import ConfigError, builtin_config, init_params

    cfg = builtin_config("llama-tiny", sliding_window=4)
    with pytest.raises(ConfigError, match="a llama config.json cannot express sliding_window=4"):
        save_pretrained(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
