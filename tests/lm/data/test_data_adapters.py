"""Each published format, read from the committed samples and from Parquet."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lm.data import PLAIN, ZEPHYR, DataError, PreferenceRecord, detect_format, read_records


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_hh_prompt_is_prefix_through_last_assistant_turn(fixtures_dir):
    records, report = read_records(fixtures_dir / "hh.jsonl")
    assert report.kept == 3 and not report.dropped
    multi = records[1]
    assert multi.prompt.count("\n\nHuman:") == 2
    assert multi.prompt.endswith("\n\nHuman: Yes, all four.\n\nAssistant:")
    assert multi.chosen.startswith(" Great. Mix them")
    assert multi.rejected == " Buy bread instead."
    for record, row in zip(records, _rows(fixtures_dir / "hh.jsonl")):
        assert record.prompt + record.chosen == row["chosen"]
        assert record.prompt + record.rejected == row["rejected"]
    assert records[2].source == f"{fixtures_dir / 'hh.jsonl'}:line 3"


def test_tldr_and_generic_strings_pass_through(fixtures_dir):
    for name, fmt in (("tldr", "tldr"), ("generic", "auto")):
        path = fixtures_dir / f"{name}.jsonl"
        records, report = read_records(path, format=fmt)
        rows = _rows(path)
        assert report.kept == len(rows) == len(records)
        for record, row in zip(records, rows):
            assert (record.prompt, record.chosen, record.rejected) == (
                row["prompt"], row["chosen"], row["rejected"])
    # The blank line of generic.jsonl is not a record; line numbers stay those of the file.
    records, _ = read_records(fixtures_dir / "generic.jsonl")
    assert records[1].source.endswith("generic.jsonl:line 3")


def test_ultrafeedback_renders_the_conversation_before_the_last_answer(fixtures_dir):
    records, report = read_records(fixtures_dir / "ultrafeedback.jsonl")
    assert report.kept == 3
    assert records[0] == PreferenceRecord(
        "\n\nHuman: Name three primary colours.\n\nAssistant:",
        " Red, yellow and blue.", " Green, pink and grey.", records[0].source)
    assert records[1].prompt == (
        "\n\nSystem: You are a translator.\n\nHuman: Translate 'cat' to German."
        "\n\nAssistant: Katze.\n\nHuman: And 'dog'?\n\nAssistant:")
    assert (records[1].chosen, records[1].rejected) == (" Hund.", " Katze again.")


def test_ultrafeedback_zephyr_template(fixtures_dir):
    records, _ = read_records(fixtures_dir / "ultrafeedback.jsonl", template="zephyr")
    assert records[2].prompt == "<|user|>\nWhat is 2 + 2?</s>\n<|assistant|>\n"
    assert (records[2].chosen, records[2].rejected) == ("4", "22")
    assert ZEPHYR.render([("user", "hi")]) == "<|user|>\nhi</s>\n<|assistant|>\n"


def test_ultrafeedback_answer_only_lists_use_the_prompt_field(tmp_path):
    path = tmp_path / "uf.jsonl"
    row = {"prompt": "Say hi.", "chosen": [{"role": "assistant", "content": "Hi!"}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    path.write_text(json.dumps(row) + "\n")
    (record,), _ = read_records(path)
    assert record.prompt == PLAIN.render([("user", "Say hi.")])


def test_webgpt_higher_score_wins_and_ties_are_dropped_and_counted(fixtures_dir):
    records, report = read_records(fixtures_dir / "webgpt.jsonl")  # on_error="fail"
    assert report.kept == 3 and dict(report.dropped) == {"tie": 1}
    assert "webgpt.jsonl:line 3" in report.first["tie"]
    assert "tie=1" in report.summary()
    assert [r.source.rsplit(" ", 1)[1] for r in records] == ["1", "2", "4"]
    assert records[0].chosen.startswith(" Sunlight") and records[0].rejected.startswith(" Because")
    # score_1 > score_0: chosen is answer_1.
    assert records[1].chosen.startswith(" Bees") and records[1].rejected == " They collect flowers."
    # question given as a plain string.
    assert records[2].prompt == "\n\nHuman: Why do cats purr?\n\nAssistant:"


def test_detect_format():
    assert detect_format({"chosen": "a", "rejected": "b"}) == "hh"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "generic"
    assert detect_format({"prompt": "p", "chosen": [], "rejected": []}) == "ultrafeedback"
    assert detect_format({"question": "q", "answer_0": "a", "answer_1": "b"}) == "webgpt"
    assert detect_format({"text": "x"}) is None


def test_unrecognised_format_is_a_file_error_even_when_skipping(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "hello"}\n{"text": "again"}\n')
    with pytest.raises(DataError, match=r"^\S*odd\.jsonl: no record has a recognisable format "
                                        r"\(first: \S*odd\.jsonl:line 1: cannot recognise"):
        read_records(path, on_error="skip")


def test_skip_detects_the_format_from_the_first_recognisable_record(tmp_path):
    """One bad first record (here without "rejected") is dropped, not the whole file."""
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "P", "chosen": "a", "rejected": "b"})
    path.write_text(json.dumps({"prompt": "P", "chosen": "a"}) + "\n" + good + "\n" + good + "\n")
    records, report = read_records(path, on_error="skip")
    assert len(records) == report.kept == 2 and dict(report.dropped) == {"unknown_format": 1}
    assert report.first["unknown_format"].startswith(f"{path}:line 1: cannot recognise the format")
    with pytest.raises(DataError, match=r"d\.jsonl:line 1: cannot recognise the format"):
        read_records(path)  # under "fail" the first record is the error


def test_several_files_in_order(fixtures_dir):
    paths = [fixtures_dir / "generic.jsonl", fixtures_dir / "hh.jsonl"]
    records, report = read_records(paths)
    assert report.kept == 5 and len(records) == 5
    assert records[1].source.startswith(str(paths[0])) and records[2].source.startswith(str(paths[1]))


@pytest.mark.parametrize("name", ["ultrafeedback", "webgpt", "hh", "tldr"])
def test_parquet_reads_the_same_records_as_jsonl(fixtures_dir, tmp_path, name):
    rows = _rows(fixtures_dir / f"{name}.jsonl")
    if name == "webgpt":  # one Arrow schema per file: give every row the dict question.
        rows = [r for r in rows if isinstance(r["question"], dict)]
        rows.append({**rows[0], "score_1": 0.5})
    path = tmp_path / f"{name}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_parquet, report = read_records(path)
    from_jsonl, _ = read_records(jsonl)
    assert len(from_parquet) == report.kept > 0
    strip = lambda rs: [(r.prompt, r.chosen, r.rejected) for r in rs]
    assert strip(from_parquet) == strip(from_jsonl)
    assert from_parquet[0].source == f"{path}:row 0"
