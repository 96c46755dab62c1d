"""serving.cores: the cores a process may use, from its CPU set and its cgroup v2 CPU limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.cores import cgroup_cpu_limit, usable_cores


def _cgroups(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree under ``tmp_path`` with ``cpu.max`` files, and a membership file naming ``own``."""
    root = tmp_path / "cgroup"
    for folder, cpu_max in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(cpu_max)
    root.mkdir(exist_ok=True)
    membership = tmp_path / "self-cgroup"
    membership.write_text(f"0::{own}\n")
    return root, membership


@pytest.mark.parametrize(
    ("cpu_max", "cores"),
    [("max 100000\n", None), ("800000 100000\n", 8), ("150000 100000\n", 2), ("50000 100000\n", 1),
     ("max\n", None), ("", None), ("100000 0\n", None), ("0 100000\n", None), ("lots of cpu\n", None)],
)  # fmt: skip
def test_a_cpu_max_file_gives_whole_cores_rounded_up_or_none(tmp_path: Path, cpu_max: str, cores: int | None) -> None:
    """A container limited to 8 CPUs may run 8 threads at once; 1.5 CPUs still keep a second thread busy."""
    root, membership = _cgroups(tmp_path, "/", {".": cpu_max})
    assert cgroup_cpu_limit(root, membership) == cores


def test_the_tightest_limit_from_the_processs_cgroup_up_counts(tmp_path: Path) -> None:
    """A service in a slice (no cgroup namespace): its own cgroup sets none, its parent 4, the slice 8."""
    root, membership = _cgroups(
        tmp_path, "/system.slice/app/worker", {"system.slice": "800000 100000", "system.slice/app": "400000 100000"}
    )
    assert cgroup_cpu_limit(root, membership) == 4


def test_no_cgroup_v2_or_no_limit_is_none(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-membership") is None
    root, membership = _cgroups(tmp_path, "/", {})
    assert cgroup_cpu_limit(root, membership) is None


@pytest.mark.parametrize(("cpu_set", "limit", "cores"), [(64, "800000 100000", 8), (4, "800000 100000", 4)])
def test_usable_cores_take_the_smaller_of_the_cpu_set_and_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu_set: int, limit: str, cores: int
) -> None:
    root, membership = _cgroups(tmp_path, "/", {".": limit})
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cpu_set)))
    monkeypatch.setattr("serving.cores._CGROUP_ROOT", root)
    monkeypatch.setattr("serving.cores._MEMBERSHIP", membership)
    assert usable_cores() == cores
