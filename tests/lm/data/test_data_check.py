"""The ``python -m lm.data.check`` command: report lines, one-line errors, exit codes."""

from lm.data import check, read_records


def test_report_and_buckets(fixtures_dir, tokenizer, tmp_path, capsys):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    code = check.main([str(fixtures_dir / "webgpt.jsonl"), "--tokenizer", str(path),
                       "--eos-token", "<eos>", "--max-len", "64", "--max-prompt-len", "32"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    records, _ = read_records(fixtures_dir / "webgpt.jsonl")
    n = lambda text: len(tokenizer.encode(text).ids)
    longest = [min(64, n(r.prompt) + 1 + max(n(r.chosen), n(r.rejected))) for r in records]
    counts = [sum(lo < x <= hi for x in longest) for lo, hi in ((0, 16), (16, 32), (32, 64))]
    assert out[0] == "pairs per bucket: 16={}, 32={}, 64={}".format(*counts)
    truncated = sum(n(r.prompt) + n(resp) + 1 > 64 for r in records for resp in (r.chosen, r.rejected))
    assert truncated > 0
    assert out[1] == f"kept 3 records; dropped 1 (tie=1); truncated {truncated} responses"
    assert out[2].startswith("  first tie: ") and "webgpt.jsonl:line 3" in out[2]


def test_bad_record_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "P", "chosen": "a", "rejected": "b"}\n{"prompt": "P", "chosen": "a"}\n')
    assert check.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {path}:line 2: field 'rejected': missing\n"
    assert check.main([str(path), "--on-error", "skip"]) == 0
    assert "dropped 1 (missing_field=1)" in capsys.readouterr().out


def test_bad_tokenizer_and_unknown_eos(fixtures_dir, tokenizer, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    assert check.main([str(fixtures_dir / "hh.jsonl"), "--tokenizer", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad}: not a tokenizer.json")
    good = tmp_path / "good.json"
    tokenizer.save(str(good))
    assert check.main([str(fixtures_dir / "hh.jsonl"), "--tokenizer", str(good)]) == 2
    assert "--eos-token '<|endoftext|>' is not in" in capsys.readouterr().err


def test_max_prompt_len_defaults_to_half_of_max_len(fixtures_dir, tokenizer, tmp_path, capsys):
    """--max-len 128 alone works (the prompt budget was a fixed 256); a bad pair of lengths is
    one line naming the flags."""
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    argv = [str(fixtures_dir / "webgpt.jsonl"), "--tokenizer", str(path), "--eos-token", "<eos>"]
    assert check.main([*argv, "--max-len", "128"]) == 0
    assert check.parse_args([*argv, "--max-len", "128"]).max_prompt_len == 64
    capsys.readouterr()
    assert check.main([*argv, "--max-len", "64", "--max-prompt-len", "64"]) == 2
    assert capsys.readouterr().err == "error: --max-prompt-len 64: must be at least 1 and below --max-len 64\n"
