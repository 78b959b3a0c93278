"""lm.tokenizer: tokenizer.json + special-token ids, and tidy errors."""

import json
import shutil
from pathlib import Path

import pytest

from lm.tokenizer import TokenizerError, load_tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "tokenizer"


def test_loads_and_round_trips_text():
    tok = load_tokenizer(FIXTURE)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.token_to_id("</s>") == tok.eos_id and tok.vocab_size > 4
    ids = tok.encode("the cat sat on the mat").ids
    assert ids and tok.decode(ids) == "the cat sat on the mat"
    assert [e.ids for e in tok.encode_batch(["the cat", "hello world"])] == [
        tok.encode("the cat").ids, tok.encode("hello world").ids]


def test_config_json_ids_take_precedence(tmp_path):
    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    (d / "config.json").write_text(json.dumps({"eos_token_id": [3, 2], "pad_token_id": None}))
    tok = load_tokenizer(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (3, 0, 1)


def test_special_tokens_map_and_added_token_dicts(tmp_path):
    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    (d / "tokenizer_config.json").unlink()
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "</s>", "lstrip": False}, "bos_token": "<s>"}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: file not found"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_unknown_special_token_is_named(tmp_path):
    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token='<\|end\|>' "
                                             "is not in the tokenizer's vocabulary"):
        load_tokenizer(d)
