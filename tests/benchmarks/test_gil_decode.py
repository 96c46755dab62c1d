"""The decode probe: each switch interval gets a row alone and a row beside the GIL-holding bursts."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gil_decode
from benchmarks.photos import validation_photos


def test_every_validation_photo_is_read_as_the_jpeg_clients_send(photo_zip: Path) -> None:
    photos = validation_photos(photo_zip)
    assert len(photos) == 1000
    assert {name.split(".")[0] for name in photos} == {"cat", "dog"}, "named by their class folder"
    assert all(photo[:2] == b"\xff\xd8" for photo in photos.values()), "JPEG bytes as stored, not re-encoded"


def test_a_zip_without_validation_photos_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "train-only.zip"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("train/cat/cat.0.jpg", b"\xff\xd8")
    with pytest.raises(ValueError, match="no JPEG under a val/ folder"):
        validation_photos(empty)


def test_a_switch_interval_of_zero_is_a_usage_error(photo_zip: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gil_decode.main([str(photo_zip), "--intervals-ms", "0"])
    assert "a switch interval is more than 0 ms" in capsys.readouterr().err


def test_a_row_per_interval_alone_and_beside_the_bursts(
    photo_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The probe decodes every photo at least once per row and leaves the process's switch interval as it was."""
    before = sys.getswitchinterval()
    output = tmp_path / "gil.json"
    arguments = [str(photo_zip), "--intervals-ms", "5", "0.5", "--seconds", "0", "--limit", "12"]
    gil_decode.main([*arguments, "--burst-ms", "1", "--pause-ms", "0.5", "--json", str(output)])
    rows = json.loads(output.read_text())
    beside = "1 ms bursts, 0.5 ms pauses"
    assert [row["beside"] for row in rows] == ["nothing", beside, "nothing", beside]
    in_force = [row["interval_ms"] for row in rows]  # read back while decoding, so the switch took effect
    assert in_force == pytest.approx([5.0, 5.0, 0.5, 0.5])
    assert all(row["images"] >= 12 and row["wall_ms"] > 0 and row["cpu_ms"] > 0 for row in rows)
    assert sys.getswitchinterval() == before
    printed = capsys.readouterr().out
    assert printed.startswith("12 photos, Python ")
    assert "interval ms  beside" in printed
