"""lm.tokenizer: tokenizer.json + special-token ids, and tidy errors."""

import json
import shutil
from pathlib import Path

import pytest

from lm.tokenizer import TokenizerError, load_tokenizer, prompt_bos

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "tokenizer"


def test_loads_and_round_trips_text():
    tok = load_tokenizer(FIXTURE)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.token_to_id("</s>") == tok.eos_id and tok.vocab_size > 4
    ids = tok.encode("the cat sat on the mat").ids
    assert ids and tok.decode(ids) == "the cat sat on the mat"
    assert [e.ids for e in tok.encode_batch(["the cat", "hello world"])] == [
        tok.encode("the cat").ids, tok.encode("hello world").ids]


def test_padding_and_truncation_in_tokenizer_json_are_turned_off(tmp_path):
    """A tokenizer.json saved with padding and truncation on encodes exactly as without them
    (the pipeline pads and truncates itself); a raw tokenizer with them on is refused."""
    from tokenizers import Tokenizer

    from lm.data import PreferenceRecord, TokenizeConfig, tokenize_records

    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    raw.enable_padding(pad_id=0, length=16)
    raw.enable_truncation(max_length=2)
    raw.save(str(d / "tokenizer.json"))
    text = "the cat sat on the mat"
    assert raw.encode(text).ids != load_tokenizer(FIXTURE).encode(text).ids
    tok = load_tokenizer(d)
    assert tok.encode(text).ids == load_tokenizer(FIXTURE).encode(text).ids
    assert tok.tokenizer.padding is None and tok.tokenizer.truncation is None
    record = PreferenceRecord(text, " the mat", " the cat", "x.jsonl:line 1")
    config = TokenizeConfig(max_len=64, max_prompt_len=32, eos_id=2)
    assert len(tokenize_records([record], tok, config)[0]) == 1
    for setting in ("padding", "truncation"):
        with pytest.raises(ValueError, match=f"tokenizer: {setting} is on"):
            tokenize_records([record], raw, config)
        (raw.no_padding if setting == "padding" else raw.no_truncation)()


def test_prompts_start_with_the_bos_the_post_processor_adds(tmp_path):
    """Llama and Mistral's tokenizer.json put <s> before every text (TemplateProcessing): their
    prompts start with it, once even where the text already does; GPT-2-style tokenizers
    (no such post-processor) add none."""
    from tokenizers import processors

    from lm.data import PreferenceRecord, TokenizeConfig, tokenize_records

    plain = load_tokenizer(FIXTURE)
    assert prompt_bos(plain) is None
    llama = load_tokenizer(FIXTURE).tokenizer
    llama.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert prompt_bos(llama) == 1
    config = TokenizeConfig(max_len=64, max_prompt_len=32, eos_id=2, bos_id=prompt_bos(llama))
    records = [PreferenceRecord(p, " the mat", " the cat", "x.jsonl:line 1")
               for p in ("the cat sat on", "<s>the cat sat on")]
    pairs, _ = tokenize_records(records, llama, config)
    body = plain.encode("the cat sat on").ids
    assert [p.tolist() for p in pairs.prompt] == [[1] + body, [1] + body]


def test_config_json_ids_take_precedence(tmp_path):
    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    (d / "config.json").write_text(json.dumps({"eos_token_id": [3, 2], "pad_token_id": None}))
    tok = load_tokenizer(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (3, 0, 1)


def test_an_empty_list_of_config_ids_falls_back_to_the_token_files(tmp_path):
    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    (d / "config.json").write_text(json.dumps({"eos_token_id": [], "bos_token_id": [1, 5]}))
    tok = load_tokenizer(d)
    assert (tok.eos_id, tok.bos_id) == (2, 1)


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
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a tokenizer\.json \("):
        load_tokenizer(tmp_path)


def test_unknown_special_token_is_named(tmp_path):
    d = Path(shutil.copytree(FIXTURE, tmp_path / "tok"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token='<\|end\|>' "
                                             "is not in the tokenizer's vocabulary"):
        load_tokenizer(d)
