"""Tokenising preference records: responses as their text's tokens after the prompt,
with a length policy.

For a record ``(x, y+, y-)`` the two sequences are

    prompt_ids   = [bos] + enc(x)                 (bos only when ``bos_id`` is set and
                                                   enc(x) does not start with it)
    response_ids = enc(x + y)[len(enc(x)):] + [eos]   for y in (y+, y-)
    sequence     = prompt_ids + response_ids

so the loss mask covers the response tokens and nothing else, and they are the tokens the
model reads and writes after that prompt. Encoding a response alone would differ where the
tokenizer treats the start of a text specially: Llama-2, Mistral and Zephyr's
``tokenizer.json`` prepend "▁" to every text they encode, so a response encoded alone
starts with a word-initial token (a space the text does not have). A record whose prompt
is not a token prefix of ``x + y`` (its last token merges with the response's first, as a
byte-level BPE merges a prompt's trailing space into the next word) keeps ``enc(y)``, the
response's own tokens: the boundary stays where the texts meet.
``enc`` is ``tokenizer.encode(text, add_special_tokens=False).ids`` (a
``tokenizers.Tokenizer`` or anything with that method): special tokens are added here,
once, not by a post-processor.

Length policy (``max_len`` total, ``max_prompt_len`` prompt, both in tokens, BOS
included):

- A prompt longer than ``max_prompt_len`` is *not* truncated: the record is reported as
  ``"prompt_too_long"`` under ``on_error`` (fail, or skip and count). Cutting a dialogue
  silently changes what the preference was about.
- A response that does not fit in ``max_len - len(prompt_ids)`` is truncated from the
  right, and its EOS is dropped with the cut: the model is not taught to stop where the
  text merely ran out of room. Truncated responses are counted in ``Report.truncated``.
- ``max_prompt_len < max_len``, so every response keeps at least one token.
- A pair whose chosen and rejected token ids are equal holds no preference for DPO: it is
  reported under ``on_error`` as ``"identical_after_truncation"`` when they differed only
  past the cut, else as ``"identical_responses"``.
- An empty prompt needs ``bos_id``: the first response token must have a context token to
  be predicted from (reason ``"empty_prompt"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from lm.data.records import DataError, PreferenceRecord, Report, check_on_error


class Encoding(Protocol):
    ids: list[int]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> Encoding: ...


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Token budget and special ids. ``pad_id`` defaults to ``eos_id``."""

    max_len: int
    max_prompt_len: int
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        if not 0 < self.max_prompt_len < self.max_len:
            raise ValueError(
                f"need 0 < max_prompt_len < max_len, got max_prompt_len={self.max_prompt_len}, "
                f"max_len={self.max_len}"
            )

    @property
    def pad(self) -> int:
        return self.eos_id if self.pad_id is None else self.pad_id


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Ragged token ids of N pairs: ``prompt[i] + chosen[i]`` and ``prompt[i] + rejected[i]``.

    Arrays are int32. ``source[i]`` names the record (file and line) the pair came from.
    """

    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    source: list[str]

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def lengths(self) -> np.ndarray:
        """[N] int: the longer of the two sequences of each pair (what the pair pads to)."""
        return np.array(
            [
                len(p) + max(len(c), len(r))
                for p, c, r in zip(self.prompt, self.chosen, self.rejected)
            ],
            dtype=np.int64,
        )

    @property
    def prompt_keys(self) -> list[bytes]:
        """[N] hashable keys, equal for pairs whose prompts have the same tokens (to split
        train from held-out by prompt, :func:`lm.data.split_indices`)."""
        return [p.tobytes() for p in self.prompt]

    def take(self, indices: Sequence[int] | np.ndarray) -> TokenizedPairs:
        """The pairs at ``indices``, in that order."""
        idx = [int(i) for i in indices]
        return TokenizedPairs(
            [self.prompt[i] for i in idx],
            [self.chosen[i] for i in idx],
            [self.rejected[i] for i in idx],
            [self.source[i] for i in idx],
        )


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    for setting in ("padding", "truncation"):
        if getattr(inner, setting, None):
            raise ValueError(f"tokenizer: {setting} is on ({getattr(inner, setting)}); the "
                             "pipeline pads and truncates itself "
                             "(lm.tokenizer.read_tokenizer_json turns it off)")
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def tokenize_records(
    records: Sequence[PreferenceRecord],
    tokenizer: Tokenizer,
    config: TokenizeConfig,
    *,
    on_error: str = "fail",
    report: Report | None = None,
) -> tuple[TokenizedPairs, Report]:
    """Tokenise ``records`` under the length policy of the module docstring.

    Args:
      records: from :func:`lm.data.files.read_records` (or built in memory).
      tokenizer: ``encode(text, add_special_tokens=False).ids`` (``encode_batch`` is used
        when present).
      config: lengths and special ids.
      on_error: ``"fail"`` or ``"skip"``; applies to too-long and empty prompts and to
        pairs whose two responses have the same ids (after truncation).
      report: the report from reading, to continue (its ``kept`` is decreased by the
        records dropped here); else a new one with ``kept = len(records)``.
    """
    policy = check_on_error(on_error)
    if report is None:
        report = Report(kept=len(records))
    prompts = _encode_all(tokenizer, [r.prompt for r in records])
    chosen = _encode_all(tokenizer, [r.prompt + r.chosen for r in records])
    rejected = _encode_all(tokenizer, [r.prompt + r.rejected for r in records])
    out = TokenizedPairs([], [], [], [])
    for record, p, c, r in zip(records, prompts, chosen, rejected):
        # A prompt whose text starts with the BOS token keeps that one.
        prompt_ids = ([] if config.bos_id is None or p[:1] == [config.bos_id]
                      else [config.bos_id]) + p
        room = config.max_len - len(prompt_ids)
        c, r = (_after_prompt(tokenizer, p, ids, text)
                for ids, text in ((c, record.chosen), (r, record.rejected)))
        responses = [(ids + [config.eos_id])[:room] for ids in (c, r)]
        cut = sum(len(ids) + 1 > room for ids in (c, r))
        try:
            _check_pair(record.source, prompt_ids, responses, cut, config)
        except DataError as err:
            report.drop(err, policy)
            report.kept -= 1
            continue
        report.truncated += cut
        out.prompt.append(np.asarray(prompt_ids, dtype=np.int32))
        out.chosen.append(np.asarray(responses[0], dtype=np.int32))
        out.rejected.append(np.asarray(responses[1], dtype=np.int32))
        out.source.append(record.source)
    return out, report


def _after_prompt(tokenizer: Any, prompt: list[int], joint: list[int], response: str) -> list[int]:
    """The response's ids: ``joint`` (the encoded prompt + response) after ``prompt``, or the
    response encoded alone where the prompt is not a token prefix of ``joint``."""
    if joint[:len(prompt)] == prompt:
        return joint[len(prompt):]
    return _encode_all(tokenizer, [response])[0]


def _check_pair(
    source: str, prompt_ids: list[int], responses: list[list[int]], cut: int,
    config: TokenizeConfig,
) -> None:
    """Raise the :class:`DataError` of the first length-policy problem of one pair, if any
    (``responses`` as cut to fit, ``cut`` of them truncated)."""
    if not prompt_ids:
        raise DataError(
            source, "prompt", "empty_prompt",
            "empty prompt and no bos_id: the first response token has no context",
        )
    if len(prompt_ids) > config.max_prompt_len:
        raise DataError(
            source, "prompt", "prompt_too_long",
            f"prompt is {len(prompt_ids)} tokens, over max_prompt_len={config.max_prompt_len}",
        )
    if responses[0] == responses[1]:
        if cut:
            raise DataError(
                source, "rejected", "identical_after_truncation",
                f"identical to the chosen response once both are cut to max_len={config.max_len} "
                "tokens (they differ only past it)",
            )
        raise DataError(
            source, "rejected", "identical_responses", "the same tokens as the chosen response"
        )
