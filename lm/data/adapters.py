"""Adapters from the published preference-data formats to :class:`PreferenceRecord`.

Formats (``format=`` name, the fields that identify it, how it maps):

- ``"generic"``: ``prompt`` / ``chosen`` / ``rejected`` strings, used as they are.
- ``"tldr"``: the Reddit TL;DR comparisons as published by trl-lib / CarperAI: the same
  three string fields (the prompt ends with ``"TL;DR:"``), so the same mapping.
- ``"hh"``: Anthropic HH-RLHF, ``chosen`` / ``rejected`` full dialogues
  ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``. The prompt is ``chosen`` through its last
  ``"\\n\\nAssistant:"``; both responses are what follows it (``rejected`` must start
  with the same prompt).
- ``"ultrafeedback"``: UltraFeedback binarized, ``chosen`` / ``rejected`` message lists
  ``[{"role", "content"}, ...]``. The response is the last message (role
  ``assistant``); the prompt is the preceding messages (identical in both lists)
  rendered with a :class:`ChatTemplate`. If the lists hold only the answer, the ``prompt``
  string is the single user turn.
- ``"webgpt"``: openai/webgpt_comparisons, ``question`` (a dict with ``"full_text"``,
  or a string) / ``answer_0`` / ``answer_1`` / ``score_0`` / ``score_1``. The question is
  rendered as one user turn with the :class:`ChatTemplate`; chosen is the answer with the
  higher score. Ties are dropped and counted as ``"tie"``.

``detect_format`` picks the format from a record's fields; ``read_records`` asks it about a
file's first record (under ``on_error="skip"``, its first recognisable one), and every
later record must then match that format. Each adapter checks the fields it reads and
raises :class:`DataError` naming the field of the *file* (e.g. ``answer_1``), so a message
points at what to fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from lm.data.records import DataError, PreferenceRecord

Row = Mapping[str, Any]

FORMATS: tuple[str, ...] = ("generic", "tldr", "hh", "ultrafeedback", "webgpt")

HH_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Renders a message list as a prompt that ends where the assistant's answer begins.

    ``prompt = "".join(message.format(role=role_names.get(r, r), content=c)) +
    generation_prompt`` and the response text is ``response_prefix + answer``.
    """

    message: str
    generation_prompt: str
    response_prefix: str = ""
    role_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def render(self, messages: list[tuple[str, str]]) -> str:
        turns = (
            self.message.format(role=self.role_names.get(role, role), content=content)
            for role, content in messages
        )
        return "".join(turns) + self.generation_prompt


# The HH dialogue convention: the prompt of a rendered conversation looks like an HH one.
PLAIN = ChatTemplate(
    message="\n\n{role}: {content}",
    generation_prompt=HH_ASSISTANT,
    response_prefix=" ",
    role_names={"user": "Human", "assistant": "Assistant", "system": "System"},
)
# Zephyr / Alignment-Handbook chat format (the SFT model the paper uses on UltraFeedback);
# the "</s>" ending the answer is the EOS the tokeniser appends.
ZEPHYR = ChatTemplate(message="<|{role}|>\n{content}</s>\n", generation_prompt="<|assistant|>\n")

TEMPLATES: dict[str, ChatTemplate] = {"plain": PLAIN, "zephyr": ZEPHYR}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def detect_format(row: Row) -> str | None:
    """The format whose identifying fields ``row`` has, or None."""
    if "answer_0" in row and "answer_1" in row:
        return "webgpt"
    if "chosen" not in row or "rejected" not in row:
        return None
    if isinstance(row["chosen"], list):
        return "ultrafeedback"
    if "prompt" not in row:
        return "hh"
    return "generic"


def _text(
    row: Row, key: str, source: str, *, response: bool = True, label: str | None = None
) -> str:
    """``row[key]`` as a valid string; a response must also be non-blank.

    ``label`` names the field in errors when ``row`` is nested (``"chosen[1].content"``).
    """
    field = label or key
    if key not in row:
        raise DataError(source, field, "missing_field", "missing")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            source, field, "not_a_string", f"expected a string, got {type(value).__name__}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(source, field, "invalid_utf8", f"invalid UTF-8 ({e.reason})") from None
    if response and not value.strip():
        raise DataError(source, field, "empty_response", "empty response")
    return value


def _distinct(chosen: str, rejected: str, source: str, field: str) -> None:
    if chosen == rejected:
        raise DataError(source, field, "identical_responses", "identical to the chosen response")


def generic(row: Row, source: str, template: ChatTemplate) -> PreferenceRecord:
    del template
    prompt = _text(row, "prompt", source, response=False)
    chosen = _text(row, "chosen", source)
    rejected = _text(row, "rejected", source)
    _distinct(chosen, rejected, source, "rejected")
    return PreferenceRecord(prompt, chosen, rejected, source)


def hh(row: Row, source: str, template: ChatTemplate) -> PreferenceRecord:
    del template
    full_chosen = _text(row, "chosen", source)
    full_rejected = _text(row, "rejected", source)
    cut = full_chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(source, "chosen", "bad_dialogue", f"no {HH_ASSISTANT!r} turn")
    prompt = full_chosen[: cut + len(HH_ASSISTANT)]
    if not full_rejected.startswith(prompt):
        raise DataError(
            source, "rejected", "prompt_mismatch",
            "does not start with the chosen dialogue's prompt (through its last Assistant turn)",
        )
    chosen, rejected = full_chosen[len(prompt):], full_rejected[len(prompt):]
    if not chosen.strip():
        raise DataError(source, "chosen", "empty_response", "empty response")
    if not rejected.strip():
        raise DataError(source, "rejected", "empty_response", "empty response")
    _distinct(chosen, rejected, source, "rejected")
    return PreferenceRecord(prompt, chosen, rejected, source)


def _messages(row: Row, field: str, source: str) -> list[tuple[str, str]]:
    if field not in row:
        raise DataError(source, field, "missing_field", "missing")
    value = row[field]
    if not isinstance(value, list) or not value:
        raise DataError(source, field, "bad_messages", "expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise DataError(
                source, f"{field}[{i}]", "bad_messages", "expected {'role': ..., 'content': ...}"
            )
        role = _text(message, "role", source, response=False, label=f"{field}[{i}].role")
        content = _text(
            message, "content", source, response=False, label=f"{field}[{i}].content"
        )
        out.append((role, content))
    if out[-1][0] != "assistant":
        raise DataError(
            source, f"{field}[{len(out) - 1}]", "bad_messages",
            f"last message has role {out[-1][0]!r}, expected 'assistant'",
        )
    if not out[-1][1].strip():
        raise DataError(source, f"{field}[{len(out) - 1}]", "empty_response", "empty response")
    return out


def ultrafeedback(row: Row, source: str, template: ChatTemplate) -> PreferenceRecord:
    chosen = _messages(row, "chosen", source)
    rejected = _messages(row, "rejected", source)
    context = chosen[:-1]
    if rejected[:-1] != context:
        raise DataError(
            source, "rejected", "prompt_mismatch",
            "conversation before the answer differs from chosen",
        )
    if not context:
        context = [("user", _text(row, "prompt", source, response=False))]
    _distinct(chosen[-1][1], rejected[-1][1], source, "rejected")
    return PreferenceRecord(
        template.render(context),
        template.response_prefix + chosen[-1][1],
        template.response_prefix + rejected[-1][1],
        source,
    )


def _score(row: Row, field: str, source: str) -> float:
    if field not in row:
        raise DataError(source, field, "missing_field", "missing")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise DataError(source, field, "bad_score", f"expected a number, got {value!r}")
    return float(value)


def webgpt(row: Row, source: str, template: ChatTemplate) -> PreferenceRecord:
    if "question" not in row:
        raise DataError(source, "question", "missing_field", "missing")
    question = row["question"]
    if isinstance(question, Mapping):
        question = _text(
            question, "full_text", source, response=False, label="question.full_text"
        )
    else:
        question = _text(row, "question", source, response=False)
    answers = [_text(row, "answer_0", source), _text(row, "answer_1", source)]
    scores = [_score(row, "score_0", source), _score(row, "score_1", source)]
    if scores[0] == scores[1]:
        raise DataError(source, "score_1", "tie", f"tie (both scores {scores[0]:g})")
    _distinct(answers[0], answers[1], source, "answer_1")
    best = 0 if scores[0] > scores[1] else 1
    return PreferenceRecord(
        template.render([("user", question)]),
        template.response_prefix + answers[best],
        template.response_prefix + answers[1 - best],
        source,
    )


ADAPTERS: dict[str, Callable[[Row, str, ChatTemplate], PreferenceRecord]] = {
    "generic": generic,
    "tldr": generic,
    "hh": hh,
    "ultrafeedback": ultrafeedback,
    "webgpt": webgpt,
}
