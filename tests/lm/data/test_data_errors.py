"""Bad input: one message naming file, line (or Parquet row) and field; fail vs skip."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.data import DataError, TokenizeConfig, read_records, tokenize_records

GOOD = json.dumps({"prompt": "P", "chosen": "yes", "rejected": "no"}).encode()

# (raw line 2, expected message after "<file>:line 2", reason)
GENERIC_CASES = {
    "missing": (json.dumps({"prompt": "P", "chosen": "yes"}).encode(),
                ": field 'rejected': missing", "missing_field"),
    "not_string": (json.dumps({"prompt": "P", "chosen": 5, "rejected": "no"}).encode(),
                   ": field 'chosen': expected a string, got int", "not_a_string"),
    "empty": (json.dumps({"prompt": "P", "chosen": "yes", "rejected": " \n"}).encode(),
              ": field 'rejected': empty response", "empty_response"),
    "identical": (json.dumps({"prompt": "P", "chosen": "same", "rejected": "same"}).encode(),
                  ": field 'rejected': identical to the chosen response", "identical_responses"),
    "malformed": (b'{"prompt": "P", "chosen": "yes",', ": malformed JSON (Expecting property name "
                  "enclosed in double quotes)", "malformed_json"),
    "bad_bytes": (b'{"prompt": "P", "chosen": "\xff\xfe", "rejected": "no"}',
                  ": invalid UTF-8 at byte offset 27", "invalid_utf8"),
    "surrogate": (b'{"prompt": "P", "chosen": "\\ud800", "rejected": "no"}',
                  ": field 'chosen': invalid UTF-8 (surrogates not allowed)", "invalid_utf8"),
    "not_object": (b'["P", "yes", "no"]', ": expected a JSON object, got list", "not_an_object"),
}

# Format-specific faults: (format, line-2 row, expected message suffix, reason).
FORMAT_CASES = {
    "hh_no_assistant": ("hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"},
                        ": field 'chosen': no '\\n\\nAssistant:' turn", "bad_dialogue"),
    "hh_other_prompt": ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: b",
                               "rejected": "\n\nHuman: X\n\nAssistant: c"},
                        ": field 'rejected': does not start with the chosen dialogue's prompt "
                        "(through its last Assistant turn)", "prompt_mismatch"),
    "hh_empty_answer": ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: ",
                               "rejected": "\n\nHuman: a\n\nAssistant: c"},
                        ": field 'chosen': empty response", "empty_response"),
    "uf_last_not_assistant": (
        "ultrafeedback",
        {"chosen": [{"role": "user", "content": "q"}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ": field 'chosen[0]': last message has role 'user', expected 'assistant'", "bad_messages"),
    "uf_no_content": (
        "ultrafeedback",
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}],
         "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ": field 'chosen[1].content': expected a string, got int", "not_a_string"),
    "uf_other_context": (
        "ultrafeedback",
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]},
        ": field 'rejected': conversation before the answer differs from chosen", "prompt_mismatch"),
    "webgpt_bad_score": ("webgpt", {"question": "q", "answer_0": "a", "answer_1": "b",
                                    "score_0": "high", "score_1": 0.0},
                         ": field 'score_0': expected a number, got 'high'", "bad_score"),
    "webgpt_no_full_text": ("webgpt", {"question": {"id": "x"}, "answer_0": "a", "answer_1": "b",
                                       "score_0": 1.0, "score_1": 0.0},
                            ": field 'question.full_text': missing", "missing_field"),
    "webgpt_identical": ("webgpt", {"question": "q", "answer_0": "a", "answer_1": "a",
                                    "score_0": 1.0, "score_1": 0.0},
                         ": field 'answer_1': identical to the chosen response",
                         "identical_responses"),
}
FORMAT_GOOD = {
    "hh": {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
    "ultrafeedback": {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
    "webgpt": {"question": "q", "answer_0": "a", "answer_1": "b", "score_0": 1.0, "score_1": 0.0},
}


def _write(tmp_path, *lines: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("case", sorted(GENERIC_CASES))
def test_generic_fail_names_file_line_field(tmp_path, case):
    bad, suffix, _ = GENERIC_CASES[case]
    path = _write(tmp_path, GOOD, bad, GOOD)
    with pytest.raises(DataError) as info:
        read_records(path)
    assert str(info.value) == f"{path}:line 2{suffix}"


@pytest.mark.parametrize("case", sorted(GENERIC_CASES))
def test_generic_skip_counts_the_reason(tmp_path, case):
    bad, suffix, reason = GENERIC_CASES[case]
    path = _write(tmp_path, GOOD, bad, GOOD)
    records, report = read_records(path, format="generic", on_error="skip")
    assert len(records) == report.kept == 2
    assert dict(report.dropped) == {reason: 1}
    assert report.first[reason] == f"{path}:line 2{suffix}"


def test_skip_counts_every_reason_in_one_file(tmp_path):
    bad = [GENERIC_CASES[c][0] for c in sorted(GENERIC_CASES)]
    path = _write(tmp_path, GOOD, *bad, GOOD)
    records, report = read_records(path, on_error="skip")
    assert report.kept == len(records) == 2
    expected = {}
    for case in GENERIC_CASES.values():
        expected[case[2]] = expected.get(case[2], 0) + 1
    assert dict(report.dropped) == expected
    assert report.num_dropped + report.kept == len(bad) + 2


@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_format_faults(tmp_path, case):
    fmt, row, suffix, reason = FORMAT_CASES[case]
    path = _write(tmp_path, json.dumps(FORMAT_GOOD[fmt]).encode(), json.dumps(row).encode())
    with pytest.raises(DataError) as info:
        read_records(path, format=fmt)
    assert str(info.value) == f"{path}:line 2{suffix}"
    assert info.value.reason == reason
    records, report = read_records(path, format=fmt, on_error="skip")
    assert len(records) == 1 and dict(report.dropped) == {reason: 1}


def test_parquet_errors_name_the_row(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"prompt": "P", "chosen": "yes", "rejected": "no"},
            {"prompt": "P", "chosen": "", "rejected": "no"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match="^" + str(path) + r":row 1: field 'chosen': empty response$"):
        read_records(path)
    _, report = read_records(path, on_error="skip")
    assert report.kept == 1 and dict(report.dropped) == {"empty_response": 1}


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown file type"):
        read_records(tmp_path / "d.csv")
    (tmp_path / "a.json").write_text('[\n{"prompt": "P"}\n]\n')
    with pytest.raises(DataError, match=r"a\.json:line 1: a JSON array; expected JSON lines"):
        read_records(tmp_path / "a.json", on_error="skip")
    (tmp_path / "b.json").write_text('\n  \n  [{"prompt": "P"}]\n')
    with pytest.raises(DataError, match=r"b\.json:line 3: a JSON array; expected JSON lines"):
        read_records(tmp_path / "b.json", on_error="skip")
    # After a first line that is not UTF-8, an array is a bad row, not a JSON array file.
    (tmp_path / "c.jsonl").write_bytes(b"\xff\n[1, 2]\n" + json.dumps(
        {"prompt": "P", "chosen": "a", "rejected": "b"}).encode() + b"\n")
    _, report = read_records(tmp_path / "c.jsonl", on_error="skip")
    assert report.kept == 1 and dict(report.dropped) == {"invalid_utf8": 1, "not_an_object": 1}
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        read_records(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="on_error"):
        read_records(tmp_path / "a.json", on_error="ignore")
    with pytest.raises(ValueError, match="format"):
        read_records(tmp_path / "a.json", format="csv")


def test_a_file_without_a_usable_record_is_an_error(tmp_path):
    """Empty, blank, or every record dropped under skip: a file error naming the file, even
    beside a good file (most likely the wrong file), never zero records in silence."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "P", "chosen": "a", "rejected": "b"}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text("{not json\n{\n")
    for name in ("empty", "blank"):
        for fmt in ("auto", "generic"):
            with pytest.raises(DataError, match=rf"{name}\.jsonl: no records \(an empty file\)"):
                read_records([good, tmp_path / f"{name}.jsonl"], format=fmt, on_error="skip")
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable record \(all 2 dropped"):
        read_records([good, tmp_path / "bad.jsonl"], on_error="skip")
    assert read_records(good)[1].kept == 1


def test_prompt_too_long_fail_and_skip(tmp_path, tokenizer, special_ids):
    long_prompt = "word " * 40
    path = _write(tmp_path, GOOD, json.dumps(
        {"prompt": long_prompt, "chosen": "yes", "rejected": "no"}).encode())
    records, report = read_records(path)
    config = TokenizeConfig(max_len=32, max_prompt_len=16, eos_id=special_ids["eos"])
    n = len(tokenizer.encode(long_prompt).ids)
    with pytest.raises(DataError) as info:
        tokenize_records(records, tokenizer, config)
    assert str(info.value) == (
        f"{path}:line 2: field 'prompt': prompt is {n} tokens, over max_prompt_len=16")
    pairs, report = tokenize_records(records, tokenizer, config, on_error="skip", report=report)
    assert len(pairs) == report.kept == 1 and dict(report.dropped) == {"prompt_too_long": 1}
    assert "dropped 1 (prompt_too_long=1)" in report.summary()


def test_empty_prompt_needs_bos(tmp_path, tokenizer, special_ids):
    path = _write(tmp_path, json.dumps({"prompt": "", "chosen": "yes", "rejected": "no"}).encode())
    records, _ = read_records(path)
    config = TokenizeConfig(max_len=32, max_prompt_len=16, eos_id=special_ids["eos"])
    with pytest.raises(DataError, match=r"line 1: field 'prompt': empty prompt and no bos_id"):
        tokenize_records(records, tokenizer, config)
    with_bos = TokenizeConfig(32, 16, eos_id=special_ids["eos"], bos_id=special_ids["bos"])
    pairs, _ = tokenize_records(records, tokenizer, with_bos)
    assert pairs.prompt[0].tolist() == [special_ids["bos"]]


def test_a_byte_order_mark_is_not_part_of_line_1(tmp_path):
    """Some Windows editors start a UTF-8 file with a BOM: line 1 is still a record, and a
    JSON array after it is still refused."""
    path = _write(tmp_path, b"\xef\xbb\xbf" + GOOD, GOOD)
    records, report = read_records(path)
    assert len(records) == report.kept == 2 and records[0].prompt == "P"
    array = tmp_path / "a.json"
    array.write_bytes(b"\xef\xbb\xbf[" + GOOD + b"]\n")
    with pytest.raises(DataError, match=r"a\.json:line 1: a JSON array; expected JSON lines"):
        read_records(array, on_error="skip")
