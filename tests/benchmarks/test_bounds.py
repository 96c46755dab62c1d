"""The bounds of a cat/dog run, recomputed from committed raw results of a GPU node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bounds

_RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "h200" / "locked-2"


def _rows(run: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads((_RUNS / run / "catdog_grpc.json").read_text())["rows"]
    return rows


def test_eight_workers_on_main_were_held_by_their_decode_stage() -> None:
    """B/1-main unary: 16 decode threads at 1.85 ms a decode pass 8,645 images/s, its 8,720 measured."""
    unary, _ = _rows("B/1-main")
    found = bounds.row_bounds(unary, decode_threads=2, instances=2)
    assert found is not None
    assert (round(found.decode), round(found.engine)) == (8645, 9015)
    assert found.lower == "decode"
    assert found.of_lower == pytest.approx(1.01, abs=0.005)


def test_with_twelve_workers_the_engine_is_the_lower_bound() -> None:
    for row in _rows("F/2-main-w12-t2"):
        found = bounds.row_bounds(row, decode_threads=2, instances=2)
        assert found is not None
        assert found.lower == "engine"
        assert found.decode > 1.5 * found.engine


def test_a_row_where_nothing_was_decoded_has_no_bounds() -> None:
    unary, _ = _rows("B/1-main")
    idle = {**unary, "usage": {"workers": [{**w, "decoded": 0} for w in unary["usage"]["workers"]]}}  # type: ignore[index]
    assert bounds.row_bounds(idle, decode_threads=2, instances=2) is None


def test_the_table_names_each_run_and_its_lower_bound(capsys: pytest.CaptureFixture[str]) -> None:
    bounds.main([str(_RUNS / run / "catdog_grpc.json") for run in ("B/1-main", "F/2-main-w12-t2")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "mode", "images/s", "dec", "bound", "eng", "bound", "lower", "/lower"]
    assert [line.split()[-2] for line in lines[2:]] == ["decode", "decode", "engine", "engine"]
