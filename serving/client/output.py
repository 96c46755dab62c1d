"""What the client prints: outcomes as a table or JSON Lines, in input order; models as a table or JSON Lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from serving.client.calls import Outcome
from serving.client.inputs import ImageInput
from serving.protos.classify.v1 import classify_pb2 as pb

__all__ = ["InputOrder", "OutcomePrinter", "OutcomeTable", "model_json", "models_table", "outcome_json"]

_MAX_LISTED_LABELS = 12
_PROGRESS_DELAY = 1.0  # seconds: a run that ends sooner never shows a progress bar


def _score(score: float) -> float:
    """The float32 score with float32's precision: 0.998 rather than 0.9980000257492065."""
    return float(f"{score:.7g}")


def outcome_json(outcome: Outcome) -> str:
    """One JSON Lines record: the labels, or the error."""
    record: dict[str, Any] = {"path": outcome.name}
    if outcome.failure is not None:
        record["error"] = {"code": outcome.failure.code, "message": outcome.failure.message}
    else:
        record.update(
            model=outcome.model,
            version=outcome.version,
            labels=[{"label": x.label, "index": x.index, "score": _score(x.score)} for x in outcome.labels],
        )
    return json.dumps(record, ensure_ascii=False)


class OutcomeTable:
    """Aligned rows, one per label (the input's name on its first row only), or one row with the error."""

    def __init__(self, names: Sequence[str], labels: Sequence[str]) -> None:
        self.name_width = max([len("PATH"), *map(len, names)])
        self.label_width = max([len("LABEL"), len("error"), *map(len, labels)])

    def header(self) -> str:
        return f"{'PATH':<{self.name_width}}  {'LABEL':<{self.label_width}}  SCORE"

    def rows(self, outcome: Outcome) -> list[str]:
        if outcome.failure is not None:
            failure = outcome.failure
            return [
                f"{outcome.name:<{self.name_width}}  {'error':<{self.label_width}}  {failure.code}: {failure.message}"
            ]
        return [
            f"{outcome.name if i == 0 else '':<{self.name_width}}  {label.label:<{self.label_width}}  {label.score:.4f}"
            for i, label in enumerate(outcome.labels)
        ]


class InputOrder:
    """Holds outcomes that complete early until every input before them is done, so output follows input order."""

    def __init__(self) -> None:
        self._waiting: dict[int, Outcome] = {}
        self._next = 0

    def add(self, index: int, outcome: Outcome) -> Iterator[Outcome]:
        """Take ``outcome`` (of input ``index``) and yield every outcome now ready, in order."""
        self._waiting[index] = outcome
        while self._next in self._waiting:
            yield self._waiting.pop(self._next)
            self._next += 1


class OutcomePrinter:
    """Prints outcomes to stdout in input order as they complete, with a progress bar when stderr is a terminal."""

    def __init__(self, inputs: Sequence[ImageInput], labels: Sequence[str], as_json: bool) -> None:
        self.failed = 0
        self._order = InputOrder()
        self._table = None if as_json else OutcomeTable([image.name for image in inputs], labels)
        self._bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # only for people watching: keeps scripted and health-check runs lean

            self._bar = tqdm(total=len(inputs), unit="image", delay=_PROGRESS_DELAY, file=sys.stderr)
        # A bar and the output on one terminal: tqdm writes the lines and redraws the bar below them.
        self._through_bar = self._bar is not None and sys.stdout.isatty()
        if self._table is not None:
            self._write(self._table.header())

    def __enter__(self) -> OutcomePrinter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.close()
        sys.stdout.flush()

    def add(self, index: int, outcome: Outcome) -> None:
        """Take the outcome of input ``index``; print it, and any that waited for it, once all before are printed."""
        for ready in self._order.add(index, outcome):
            self.failed += ready.failure is not None
            for line in [outcome_json(ready)] if self._table is None else self._table.rows(ready):
                self._write(line)
        if self._bar is not None:
            self._bar.update(1)

    def _write(self, line: str) -> None:
        if self._through_bar:
            self._bar.write(line, file=sys.stdout)
        else:
            sys.stdout.write(line + "\n")


def _labels_text(labels: Sequence[str]) -> str:
    if len(labels) <= _MAX_LISTED_LABELS:
        return ", ".join(labels)
    return ", ".join(labels[: _MAX_LISTED_LABELS - 2]) + f", ... ({len(labels)} labels)"


def models_table(models: Sequence[pb.ModelInfo]) -> list[str]:
    """The models as an aligned table with a header row."""
    rows = [("NAME", "VERSIONS", "READY", "INPUT", "MAX BATCH", "LABELS")]
    for model in models:
        shape = f"{model.input.height}x{model.input.width}x{model.input.channels}"
        rows.append(
            (
                model.name,
                ",".join(model.versions),
                "yes" if model.ready else "no",
                f"{shape} {model.input.dtype} {model.input.layout}",
                str(model.max_batch_size),
                _labels_text(model.labels),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]) for row in rows
    ]


def model_json(model: pb.ModelInfo) -> str:
    """One JSON Lines record per model, with ListModels' field names."""
    return json.dumps(
        {
            "name": model.name,
            "versions": list(model.versions),
            "ready": model.ready,
            "input": {
                "height": model.input.height,
                "width": model.input.width,
                "channels": model.input.channels,
                "dtype": model.input.dtype,
                "layout": model.input.layout,
            },
            "labels": list(model.labels),
            "max_batch_size": model.max_batch_size,
        },
        ensure_ascii=False,
    )
