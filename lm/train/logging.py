"""What a run shows: a JSONL metrics file, a progress bar on stderr, PNG plots at the end."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Iterable, Mapping, TextIO

from lm.train.mesh import ConfigError

#: Plots drawn at the end when the metrics hold these keys: (file, title, keys).
PLOTS = (
    ("loss.png", "loss", ("loss",)),
    ("logps.png", "sequence log-probs", ("logps/chosen", "logps/rejected")),
    ("margins.png", "reward margin", ("rewards/margins",)),
)


def _jsonable(value: Any) -> Any:
    value = float(value) if not isinstance(value, (str, bool, int)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings.
    return value


class MetricsLog:
    """Append-only JSONL: one object per line, ``{"step", "split", ...metrics}``."""

    def __init__(self, path: str, *, keep_until: int | None = None):
        """Open ``path``; ``keep_until`` drops lines past that step (a resumed run
        replays them, so they would otherwise appear twice).

        A last line that is not JSON (the run was killed while writing it) is dropped
        with a warning on stderr; any other such line raises ``ConfigError`` naming the
        file and line, since dropping it would lose a row. The kept lines are written to
        a new file that replaces the old one, so a crash meanwhile loses nothing.
        """
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept: list[dict[str, Any]] = []
        if keep_until is not None and os.path.exists(path):
            kept = [r for r in read_rows_for_resume(path) if r.get("step", 0) <= keep_until]
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._rows = {(r.get("step"), r.get("split")) for r in kept}
        self._file = open(path, "a")

    def has(self, step: int, split: str) -> bool:
        """Whether a ``split`` row at ``step`` was kept from an earlier run."""
        return (step, split) in self._rows

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), "split": split}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_rows_for_resume(path: str) -> list[dict[str, Any]]:
    """The rows of a metrics file a killed run may have left: as :func:`read_jsonl`, but
    an unparsable last line (half written) is dropped with a warning on stderr.

    Raises:
      ConfigError: a line before the last is not JSON (naming the file and line).
    """
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}:{number}: not a JSON line ({err.msg}); fix or remove "
                                  "that line to resume") from None
            print(f"warning: {path}:{number}: dropped an incomplete last line (the run was "
                  f"stopped while writing it): {line.strip()[:80]!r}", file=sys.stderr)
    return rows


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: readers and
    a crash see the old contents or the new, never a part."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


class ProgressBar:
    """``step/total [####....] tok/s loss acc`` on one line, redrawn in place on a terminal
    (one line per update otherwise, so logs of batch jobs stay readable)."""

    def __init__(self, total: int, *, stream: TextIO = sys.stderr, width: int = 24):
        self.total, self.stream, self.width = total, stream, width
        self._tty = stream.isatty()

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Redraw at ``step`` with the window's ``tokens_per_s``, loss and reward accuracy."""
        filled = int(self.width * step / max(self.total, 1))
        parts = [f"{step}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}]"]
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "rewards/accuracies" in metrics:
            parts.append(f"acc {metrics['rewards/accuracies']:.3f}")
        self.stream.write(("\r" if self._tty else "") + "  ".join(parts) + ("" if self._tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def plot_metrics(rows: Iterable[Mapping[str, Any]], out_dir: str) -> list[str]:
    """Draw :data:`PLOTS` (train lines solid, eval lines dashed) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    written = []
    for name, title, keys in PLOTS:
        series = []
        for split, style in (("train", "-"), ("eval", "--")):
            for key in keys:
                pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
                if pts:
                    series.append((f"{split} {key}", style, pts))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, style, pts in series:
            ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
