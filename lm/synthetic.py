"""Synthetic preference tasks that train from scratch with no files.

The sentiment-with-suffix task of margin-pitfalls §4.2: the prompt is a short statement
built from small word lists, the chosen response names its sentiment and the rejected
one names the opposite. Three response styles vary how much the two responses share
after the differing token (margin-pitfalls Thm 1 vs Thm 3):

    single  chosen " positive"                                  rejected " negative"
    short   " It has a positive sentiment."                     (edit distance 1, 3 shared after)
    long    " It has a positive sentiment based on my judgement."  (8 shared tokens after)

The longer the shared suffix, the larger ⟨∇log π_w, ∇log π_l⟩ and the more DPO squeezes
the chosen log-probability. Generation is a pure function of ``(n, style, seed)``; the
word-level tokenizer (``tokenizers`` WordLevel + whitespace pre-tokenizer) covers every
string the generator can produce, so no token is ever unknown.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

PAD = "<pad>"
EOS = "<eos>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)

STYLES = ("single", "short", "long")

SUBJECTS = (
    "the movie", "my day", "this food", "the weather", "our trip", "the service",
    "his song", "her book", "the game", "this phone", "the party", "my team",
)
VERBS = ("was", "is", "felt", "seemed", "looked")
POSITIVE = (
    "great", "wonderful", "happy", "lovely", "amazing", "fun", "delightful", "excellent",
    "brilliant", "pleasant", "superb", "charming",
)
NEGATIVE = (
    "awful", "terrible", "sad", "boring", "horrible", "dull", "miserable", "poor",
    "dreadful", "annoying", "bleak", "painful",
)
CONNECTIVES = ("and", "and very", "and quite", "and truly")

_RESPONSE = {
    "single": " {label}",
    "short": " It has a {label} sentiment.",
    "long": " It has a {label} sentiment based on my judgement.",
}


def response(label: str, style: str) -> str:
    """The response text naming ``label`` ("positive" | "negative") in ``style``."""
    return _RESPONSE[style].format(label=label)


def statement(rng: np.random.Generator, positive: bool) -> str:
    """One statement whose adjectives all carry the requested sentiment."""
    words = POSITIVE if positive else NEGATIVE
    subject = SUBJECTS[rng.integers(len(SUBJECTS))]
    verb = VERBS[rng.integers(len(VERBS))]
    first = words[rng.integers(len(words))]
    if rng.random() < 0.5:
        return f"{subject} {verb} {first} ."
    second = words[rng.integers(len(words))]
    connective = CONNECTIVES[rng.integers(len(CONNECTIVES))]
    return f"{subject} {verb} {first} {connective} {second} ."


def sentiment_records(n: int, *, style: str = "long", seed: int = 0) -> list[dict]:
    """``n`` preference records ``{prompt, chosen, rejected, label}``.

    Labels are balanced (⌈n/2⌉ positive) in a seeded random order.

    Deterministic in ``(n, style, seed)``; different seeds give independent draws (use
    one seed for training and another for held-out evaluation).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2 == 0)
    records = []
    for positive in labels:
        label, wrong = ("positive", "negative") if positive else ("negative", "positive")
        records.append(
            {
                "prompt": statement(rng, positive),
                "chosen": response(label, style),
                "rejected": response(wrong, style),
                "label": label,
            }
        )
    return records


def vocabulary() -> list[str]:
    """Every token the generator can emit, special tokens first (ids 0, 1, 2)."""
    pre = pre_tokenizers.Whitespace()
    texts = [*SUBJECTS, *VERBS, *POSITIVE, *NEGATIVE, *CONNECTIVES, "."]
    texts += [response(label, style) for style in STYLES for label in ("positive", "negative")]
    words: list[str] = []
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            if word not in words:
                words.append(word)
    return [*SPECIAL_TOKENS, *sorted(words)]


def sentiment_tokenizer() -> Tokenizer:
    """A word-level tokenizer for the task: WordLevel vocab, whitespace pre-tokenizer.

    ``<pad>`` is id 0 and ``<eos>`` id 1; ``tokenizer.save(path)`` writes a standard
    ``tokenizer.json`` that :mod:`tokenizers` (and so the data pipeline) can load.
    """
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Write records one JSON object per line (the preference-file format of ``lm.data``)."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
