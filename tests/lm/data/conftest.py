"""A tiny byte-level BPE tokenizer, trained here on a few sentences (no files, no network).

Byte-level pre-tokenisation and decoding round-trip any text exactly, so tests can decode
masked token spans and compare them with the original strings.
"""

import pathlib

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "data"
SPECIALS = ["<pad>", "<bos>", "<eos>"]


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [p.read_text() for p in sorted(FIXTURES.glob("*.jsonl"))]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def special_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.token_to_id(f"<{name}>") for name in ("pad", "bos", "eos")}
