"""Preference records and the accounting of records that could not be used.

A :class:`PreferenceRecord` is one comparison in the common form every adapter produces:
``prompt`` (the context, already rendered to text), and two responses that continue it.
``prompt + chosen`` and ``prompt + rejected`` are the two sequences DPO scores.

Error policy (one place, shared by reading and tokenisation):

- ``on_error="fail"`` (default): the first bad record raises :class:`DataError`, whose
  message is one line naming the file, the line (JSONL, 1-based) or row (Parquet,
  0-based index), the field and the problem.
- ``on_error="skip"``: bad records are skipped and counted per reason in a
  :class:`Report`; nothing is dropped without being counted.

Ties (webgpt comparisons with equal scores) carry no preference and are always dropped
and counted as ``"tie"``, whatever the policy.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

OnError = Literal["fail", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("fail", "skip")

# Reasons that are a property of the data set, not a defect of the file.
ALWAYS_DROPPED: frozenset[str] = frozenset({"tie"})


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One comparison: ``prompt`` followed by a preferred and a dispreferred response.

    ``source`` is ``"file:line N"`` or ``"file:row N"``, carried so that later stages
    (tokenisation) can still name the record that fails.
    """

    prompt: str
    chosen: str
    rejected: str
    source: str = "<memory>"


class DataError(ValueError):
    """A bad input record; ``str(err)`` is the one-line message for the user."""

    def __init__(self, source: str, field: str | None, reason: str, problem: str):
        self.source = source
        self.field = field
        self.reason = reason
        self.problem = problem
        where = f"{source}: field '{field}'" if field is not None else source
        super().__init__(f"{where}: {problem}")


def check_on_error(on_error: str) -> OnError:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error  # type: ignore[return-value]


@dataclasses.dataclass
class Report:
    """What happened to the input: records kept, dropped (per reason) and truncated.

    ``dropped`` maps a reason (``"missing_field"``, ``"tie"``, ``"prompt_too_long"``,
    ...) to a count; ``first`` keeps the first message per reason so a summary can show
    where to look. ``truncated`` counts responses cut to the maximum total length.
    """

    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)
    truncated: int = 0

    def drop(self, err: DataError, on_error: OnError) -> None:
        """Count ``err`` under its reason, or raise it when the policy is ``"fail"``."""
        if on_error == "fail" and err.reason not in ALWAYS_DROPPED:
            raise err
        self.dropped[err.reason] += 1
        self.first.setdefault(err.reason, str(err))

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self) -> str:
        """One line, e.g. ``kept 98 records; dropped 2 (tie=2); truncated 1 responses``."""
        line = f"kept {self.kept} records"
        if self.dropped:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.dropped.items()))
            line += f"; dropped {self.num_dropped} ({reasons})"
        if self.truncated:
            line += f"; truncated {self.truncated} responses"
        return line
