"""A checkpoint directory's ``tokenizer.json`` (via the ``tokenizers`` library) and its
special-token ids.

``load_tokenizer(dir)`` returns a ``Tokenizer`` that forwards ``encode``/``encode_batch``/
``decode`` to ``tokenizers.Tokenizer`` (so it plugs into ``lm.data.tokenization``) and
carries ``bos_id``/``eos_id``/``pad_id``, resolved in this order: ids in ``config.json``,
then token strings in ``tokenizer_config.json``, then ``special_tokens_map.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import tokenizers


class TokenizerError(ValueError):
    """A missing or unreadable tokenizer; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    tokenizer: tokenizers.Tokenizer
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> tokenizers.Encoding:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch(self, texts: list[str],
                     add_special_tokens: bool = False) -> list[tokenizers.Encoding]:
        return self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)


def _json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_id(tok: tokenizers.Tokenizer, value: Any, path: Path, key: str) -> Optional[int]:
    if isinstance(value, dict):  # AddedToken serialisation {"content": ...}
        value = value.get("content")
    if value is None:
        return None
    token_id = tok.token_to_id(value)
    if token_id is None:
        raise TokenizerError(f"{path}: {key}={value!r} is not in the tokenizer's vocabulary")
    return token_id


def read_tokenizer_json(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json`` file, with the padding and
    truncation the file may carry turned off: the data pipeline pads and enforces its length
    policy itself (:mod:`lm.data.tokenization`), and either setting would put pad tokens
    inside a prompt or cut a response unreported.

    Raises:
      TokenizerError: the file is missing or not a tokenizer.json (naming it).
    """
    if not Path(path).is_file():
        raise TokenizerError(f"{path}: file not found (only tokenizer.json is supported)")
    try:
        tok = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{path}: not a tokenizer.json "
                             f"({str(e).splitlines()[0]})") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def prompt_bos(tok: Any) -> Optional[int]:
    """The id ``tok``'s post-processor puts before a single text, which the model saw first in
    pretraining (Llama and Mistral's ``<s>``, Llama 3's ``<|begin_of_text|>``), or None where it
    adds none (GPT-2, Pythia; a byte tokenizer): the ``bos_id`` a prompt starts with."""
    plain = list(tok.encode("a", add_special_tokens=False).ids)
    special = list(tok.encode("a", add_special_tokens=True).ids)
    if len(special) > len(plain) and special[1:len(plain) + 1] == plain:
        return special[0]
    return None


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load ``<directory>/tokenizer.json`` (:func:`read_tokenizer_json`) and the
    special-token ids around it."""
    directory = Path(directory)
    tok = read_tokenizer_json(directory / "tokenizer.json")
    ids: dict[str, Optional[int]] = {"bos": None, "eos": None, "pad": None}
    config = _json(directory / "config.json")
    for name in ids:
        value = config.get(f"{name}_token_id")
        if isinstance(value, list):  # HF allows a list (Llama 3's EOS): the first, or none
            value = value[0] if value else None
        ids[name] = value
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        extra = _json(directory / filename)
        for name in ids:
            if ids[name] is None:
                ids[name] = _token_id(tok, extra.get(f"{name}_token"), directory / filename,
                                      f"{name}_token")
    return Tokenizer(tok, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])
