"""lm.synthetic: seeded, balanced, well-formed records; the tokenizer covers them all."""

import json

import pytest

from lm import synthetic


@pytest.mark.parametrize("style", synthetic.STYLES)
def test_records_are_seeded_balanced_and_well_formed(style):
    a = synthetic.sentiment_records(41, style=style, seed=3)
    assert a == synthetic.sentiment_records(41, style=style, seed=3)
    assert a != synthetic.sentiment_records(41, style=style, seed=4)
    assert sum(r["label"] == "positive" for r in a) == 21
    for r in a:
        assert set(r) == {"prompt", "chosen", "rejected", "label"}
        wrong = "negative" if r["label"] == "positive" else "positive"
        assert r["chosen"] == synthetic.response(r["label"], style)
        assert r["rejected"] == synthetic.response(wrong, style)
        words = set(r["prompt"].split())
        own = synthetic.POSITIVE if r["label"] == "positive" else synthetic.NEGATIVE
        other = synthetic.NEGATIVE if r["label"] == "positive" else synthetic.POSITIVE
        assert words & set(own) and not words & set(other), r


def test_styles_differ_in_one_token_and_share_suffixes():
    tok = synthetic.sentiment_tokenizer()
    shared_after = {}
    for style in synthetic.STYLES:
        w = tok.encode(synthetic.response("positive", style)).ids
        l = tok.encode(synthetic.response("negative", style)).ids
        assert len(w) == len(l)
        diff = [i for i, (a, b) in enumerate(zip(w, l)) if a != b]
        assert len(diff) == 1
        shared_after[style] = len(w) - 1 - diff[0]
    assert shared_after == {"single": 0, "short": 2, "long": 6}


def test_tokenizer_covers_every_record_and_has_special_ids():
    tok = synthetic.sentiment_tokenizer()
    assert tok.token_to_id(synthetic.PAD) == 0 and tok.token_to_id(synthetic.EOS) == 1
    unk = tok.token_to_id(synthetic.UNK)
    for style in synthetic.STYLES:
        for r in synthetic.sentiment_records(60, style=style, seed=0):
            for text in (r["prompt"], r["chosen"], r["rejected"]):
                assert unk not in tok.encode(text).ids, text
    assert tok.get_vocab_size() == len(synthetic.vocabulary())


def test_jsonl_round_trip(tmp_path):
    records = synthetic.sentiment_records(5, seed=1)
    path = tmp_path / "prefs.jsonl"
    synthetic.write_jsonl(records, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="style"):
        synthetic.sentiment_records(2, style="medium")
    with pytest.raises(ValueError, match="n must be"):
        synthetic.sentiment_records(-1)
