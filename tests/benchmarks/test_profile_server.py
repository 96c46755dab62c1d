"""The profile summary: shares of samples per frame, and with ``--gil`` the share of time the GIL was held."""

from __future__ import annotations

from pathlib import Path

from benchmarks.profile_server import summarise


def _collapsed(tmp_path: Path) -> Path:
    """py-spy's raw format: one stack per line, frames joined by ';', then the sample count."""
    path = tmp_path / "worker.collapsed.txt"
    path.write_text("main;serve;decode 30\nmain;serve;batch 10\nmain;loop 20\n")
    return path


def test_frames_are_ranked_by_their_share_of_all_samples(tmp_path: Path) -> None:
    summary = summarise(_collapsed(tmp_path), top=2).splitlines()
    assert summary[0] == "60 samples"
    assert "GIL" not in "\n".join(summary), "without --gil the samples say nothing about the GIL"
    assert summary[1:4] == ["-- by self samples --", " 50.0%  decode", " 33.3%  loop"]
    assert summary[4:] == ["-- by inclusive samples --", "100.0%  main", " 66.7%  serve"]


def test_with_gil_samples_the_share_of_time_the_gil_was_held_is_reported(tmp_path: Path) -> None:
    """Only the GIL holder is sampled: 60 samples of 250 per second over 6 s means held 4% of the time."""
    summary = summarise(_collapsed(tmp_path), top=2, gil_chances=1500).splitlines()
    assert summary[1] == "GIL held at least 4% of the time (60 of 1500 samples)"
