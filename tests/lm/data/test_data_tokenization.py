"""Tokenisation: prompt / response boundary, BOS / EOS, and the truncation policy."""

import pytest

from lm.data import PreferenceRecord, TokenizeConfig, read_records, tokenize_records


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_byte_level_responses_are_their_own_tokens(fixtures_dir, tokenizer, special_ids):
    """With a byte-level BPE, a response's tokens after its prompt are those it has alone."""
    records, _ = read_records(fixtures_dir / "hh.jsonl")
    config = TokenizeConfig(max_len=256, max_prompt_len=128, eos_id=special_ids["eos"],
                            bos_id=special_ids["bos"])
    pairs, report = tokenize_records(records, tokenizer, config)
    assert len(pairs) == report.kept == 3 and report.truncated == 0
    for i, record in enumerate(records):
        assert pairs.prompt[i].tolist() == [special_ids["bos"]] + _ids(tokenizer, record.prompt)
        assert pairs.chosen[i].tolist() == _ids(tokenizer, record.chosen) + [special_ids["eos"]]
        assert pairs.rejected[i].tolist() == _ids(tokenizer, record.rejected) + [special_ids["eos"]]
        assert tokenizer.decode(pairs.chosen[i].tolist()) == record.chosen
        assert pairs.source[i] == record.source
        assert pairs.prompt[i].dtype.name == "int32"
    expected = [len(p) + max(len(c), len(r))
                for p, c, r in zip(pairs.prompt, pairs.chosen, pairs.rejected)]
    assert pairs.lengths.tolist() == expected


def _sentencepiece_style_tokenizer():
    """Llama-2 / Mistral / Zephyr's tokenizer.json layout: a normalizer that prepends "▁" to
    every text and writes spaces as "▁", no pre-tokenizer, byte fallback for what the
    vocabulary lacks (here the newline, as "<0x0A>")."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    corpus = ["Name three colours. Red, yellow and blue. Green, pink and grey."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<0x0A>"], show_progress=False))
    return tok


def test_responses_are_the_tokens_that_follow_their_prompt():
    """A tokenizer that prepends "▁" to every text would start a response encoded alone with
    a space it does not have: each response is the tail of its prompt + response."""
    tok = _sentencepiece_style_tokenizer()
    record = PreferenceRecord("Name three colours.\n", "Red, yellow and blue.",
                              "Green, pink and grey.", "mem:1")
    eos = tok.token_to_id("</s>")
    alone = _ids(tok, record.chosen)
    assert tok.id_to_token(alone[0]).startswith("▁")  # what a response encoded alone gets
    pairs, report = tokenize_records([record], tok, TokenizeConfig(64, 32, eos_id=eos))
    assert report.kept == 1
    for ids, response in ((pairs.chosen[0], record.chosen), (pairs.rejected[0], record.rejected)):
        assert not tok.id_to_token(int(ids[0])).startswith("▁")
        assert pairs.prompt[0].tolist() + ids.tolist() == (
            _ids(tok, record.prompt + response) + [eos])


def test_a_prompt_that_merges_into_its_response_keeps_the_response_alone(tokenizer,
                                                                        special_ids):
    """A prompt ending in a space is no token prefix of prompt + response under a byte-level
    BPE (the space joins the next word): the response keeps its own tokens."""
    record = PreferenceRecord("Answer: ", "yes", "no", "mem:1")
    assert _ids(tokenizer, record.prompt + "yes")[:len(_ids(tokenizer, record.prompt))] != (
        _ids(tokenizer, record.prompt))
    eos = special_ids["eos"]
    pairs, _ = tokenize_records([record], tokenizer, TokenizeConfig(64, 32, eos_id=eos))
    assert pairs.prompt[0].tolist() == _ids(tokenizer, record.prompt)
    assert pairs.chosen[0].tolist() == _ids(tokenizer, "yes") + [eos]


def test_long_responses_are_cut_from_the_right_without_eos(tokenizer, special_ids):
    eos = special_ids["eos"]
    record = PreferenceRecord("Q: a\nA:", " one two three four five six seven eight nine ten",
                              " no", "mem:1")
    prompt = _ids(tokenizer, record.prompt)
    chosen = _ids(tokenizer, record.chosen)
    max_len = len(prompt) + 4
    assert len(chosen) + 1 > 4  # the chosen response cannot fit
    pairs, report = tokenize_records([record], tokenizer,
                                     TokenizeConfig(max_len, len(prompt), eos_id=eos))
    assert report.truncated == 1
    assert pairs.chosen[0].tolist() == chosen[:4] and eos not in pairs.chosen[0].tolist()
    assert pairs.rejected[0].tolist() == _ids(tokenizer, " no") + [eos]
    assert len(pairs.prompt[0]) + len(pairs.chosen[0]) == max_len


def test_a_response_that_exactly_fits_keeps_its_eos(tokenizer, special_ids):
    eos = special_ids["eos"]
    record = PreferenceRecord("Q: a\nA:", " one two", " no", "mem:1")
    n_prompt = len(_ids(tokenizer, record.prompt))
    n_chosen = len(_ids(tokenizer, record.chosen)) + 1
    pairs, report = tokenize_records(
        [record], tokenizer, TokenizeConfig(n_prompt + n_chosen, n_prompt, eos_id=eos))
    assert report.truncated == 0 and pairs.chosen[0][-1] == eos


def test_any_object_with_encode_works(tokenizer, special_ids):
    class Plain:  # no encode_batch
        def encode(self, text, add_special_tokens=True):
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    record = PreferenceRecord("Q: b\nA:", " yes", " no", "mem:1")
    config = TokenizeConfig(64, 32, eos_id=special_ids["eos"])
    a, _ = tokenize_records([record], tokenizer, config)
    b, _ = tokenize_records([record], Plain(), config)
    assert [x.tolist() for x in a.prompt + a.chosen + a.rejected] == [
        x.tolist() for x in b.prompt + b.chosen + b.rejected]


@pytest.mark.parametrize("max_len,max_prompt_len", [(16, 16), (16, 0), (8, 20)])
def test_config_rejects_impossible_lengths(max_len, max_prompt_len):
    with pytest.raises(ValueError, match="max_prompt_len < max_len"):
        TokenizeConfig(max_len, max_prompt_len, eos_id=0)


def test_pad_defaults_to_eos():
    assert TokenizeConfig(16, 8, eos_id=3).pad == 3
    assert TokenizeConfig(16, 8, eos_id=3, pad_id=0).pad == 0


def test_responses_equal_after_truncation_are_dropped(tokenizer, special_ids):
    """Responses that differ only past the cut give DPO no preference: fail, or skip and
    count (the dropped pair's cut responses are not counted as truncated)."""
    from lm.data import DataError

    eos = special_ids["eos"]
    same_start = PreferenceRecord("Q: a\nA:", " one two three four", " one two three five", "mem:1")
    fits = PreferenceRecord("Q: a\nA:", " yes", " no", "mem:2")
    n_prompt = len(_ids(tokenizer, same_start.prompt))
    config = TokenizeConfig(n_prompt + 2, n_prompt, eos_id=eos)
    assert _ids(tokenizer, same_start.chosen)[:2] == _ids(tokenizer, same_start.rejected)[:2]
    with pytest.raises(DataError, match=r"^mem:1: field 'rejected': identical to the chosen response "
                                        r"once both are cut to max_len="):
        tokenize_records([same_start, fits], tokenizer, config)
    pairs, report = tokenize_records([same_start, fits], tokenizer, config, on_error="skip")
    assert pairs.source == ["mem:2"] and report.kept == 1
    assert dict(report.dropped) == {"identical_after_truncation": 1}
    assert report.truncated == sum(len(_ids(tokenizer, t)) + 1 > 2 for t in (fits.chosen, fits.rejected))
