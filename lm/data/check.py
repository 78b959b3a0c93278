"""Check preference files before training: ``python -m lm.data.check FILE... [options]``.

Reads the files with the chosen format and error policy and prints the report (records
kept, dropped per reason, truncated responses). With ``--tokenizer`` it also tokenises
under the length policy and prints the length buckets the pairs fall into. A bad record
under ``--on-error fail`` ends with its one-line message and exit status 1.
"""

from __future__ import annotations

import argparse
import collections
import sys

from lm.data.adapters import FORMATS, TEMPLATES
from lm.data.batching import bucket_for, bucket_lengths
from lm.data.files import read_records
from lm.data.records import ON_ERROR_CHOICES, DataError
from lm.data.tokenization import TokenizeConfig, tokenize_records


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lm.data.check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("files", nargs="+", help="JSONL (.jsonl/.json) or Parquet files")
    parser.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    parser.add_argument("--on-error", default="fail", choices=ON_ERROR_CHOICES)
    parser.add_argument("--template", default="plain", choices=sorted(TEMPLATES),
                        help="chat template for message-list formats (ultrafeedback, webgpt)")
    parser.add_argument("--tokenizer", help="a tokenizer.json; enables the length report")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--max-prompt-len", type=int, help="default: half of --max-len")
    parser.add_argument("--eos-id", type=int, help="default: the tokenizer's id of --eos-token")
    parser.add_argument("--eos-token", default="<|endoftext|>")
    parser.add_argument("--bos-id", type=int,
                        help="BOS id before each prompt (default: the one the tokenizer's "
                             "post-processor adds, if any: lm.tokenizer.prompt_bos)")
    args = parser.parse_args(argv)
    if args.max_prompt_len is None:
        args.max_prompt_len = args.max_len // 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.max_prompt_len < args.max_len:
        print(f"error: --max-prompt-len {args.max_prompt_len}: must be at least 1 and below "
              f"--max-len {args.max_len}", file=sys.stderr)
        return 2
    try:
        records, report = read_records(
            args.files, format=args.format, on_error=args.on_error, template=args.template
        )
        if args.tokenizer:
            from lm.tokenizer import prompt_bos, read_tokenizer_json

            tokenizer = read_tokenizer_json(args.tokenizer)  # a TokenizerError is a ValueError
            eos = args.eos_id if args.eos_id is not None else tokenizer.token_to_id(args.eos_token)
            if eos is None:
                print(
                    f"error: --eos-token {args.eos_token!r} is not in {args.tokenizer}; "
                    "pass --eos-id",
                    file=sys.stderr,
                )
                return 2
            config = TokenizeConfig(
                args.max_len, args.max_prompt_len, eos_id=eos,
                bos_id=prompt_bos(tokenizer) if args.bos_id is None else args.bos_id
            )
            pairs, report = tokenize_records(
                records, tokenizer, config, on_error=args.on_error, report=report
            )
            buckets = bucket_lengths(args.max_len)
            counts = collections.Counter(bucket_for(n, buckets) for n in pairs.lengths)
            print("pairs per bucket: " + ", ".join(f"{b}={counts[b]}" for b in buckets))
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    for reason, message in sorted(report.first.items()):
        print(f"  first {reason}: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
