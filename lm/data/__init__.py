"""Preference data: records, dataset adapters, tokenisation, length buckets, batches.

    records, report = read_records("hh.jsonl", on_error="skip")      # files.py, adapters.py
    pairs, report = tokenize_records(records, tok, cfg, report=report)  # tokenization.py
    loader = PairLoader(pairs, 8, buckets=bucket_lengths(cfg.max_len), pad_id=cfg.pad)
    batch = loader.batch(step)                                          # loader.py, batching.py
"""

from lm.data.adapters import FORMATS, PLAIN, ZEPHYR, ChatTemplate, detect_format
from lm.data.batching import bucket_for, bucket_lengths, collate, with_ref_logps
from lm.data.files import iter_rows, read_records
from lm.data.loader import PairLoader, split_indices
from lm.data.records import DataError, PreferenceRecord, Report
from lm.data.tokenization import TokenizeConfig, TokenizedPairs, tokenize_records

__all__ = [
    "FORMATS",
    "PLAIN",
    "ZEPHYR",
    "ChatTemplate",
    "DataError",
    "PairLoader",
    "PreferenceRecord",
    "Report",
    "TokenizeConfig",
    "TokenizedPairs",
    "bucket_for",
    "bucket_lengths",
    "collate",
    "detect_format",
    "iter_rows",
    "read_records",
    "split_indices",
    "tokenize_records",
    "with_ref_logps",
]
