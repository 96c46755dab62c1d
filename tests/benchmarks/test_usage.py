"""CPU use over a window of a sampled block: what happened outside the window is left out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import Server, _growth, _mean_inside, sample_usage

# Sleeps 1 s, spins a core for 1 s, then prints when it slept and when it spun, on time.monotonic()'s clock.
_SLEEP_THEN_SPIN = """
import time
slept = time.monotonic()
time.sleep(1)
spun = time.monotonic()
while time.monotonic() < spun + 1:
    pass
print(slept, spun, time.monotonic())
"""


def test_usage_over_a_window_leaves_out_what_ran_outside_it(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", _SLEEP_THEN_SPIN], stdout=subprocess.PIPE)
    server = Server("sleep-then-spin", child, port=0, log=tmp_path / "sleep-then-spin.server.log")
    with sample_usage(server) as probe:
        output, _ = child.communicate(timeout=30)
    slept, spun, ended = (float(word) for word in output.split())

    spinning = probe.over((spun, ended))
    assert spinning.server_cores > 0.7
    assert spinning.process_cores[child.pid] == pytest.approx(spinning.server_cores)
    assert spinning.window_s == pytest.approx(ended - spun)
    assert 0 < spinning.box_percent <= 100
    assert probe.over((slept, spun)).server_cores < 0.1, "asleep, the child used no CPU"
    whole = probe.over()
    assert 0.3 < whole.server_cores < 0.6, "1 s of CPU over 2 s and more, kept after the child exited"
    assert whole.window_s is None


def test_a_window_outside_the_block_is_refused(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    server = Server("short", child, port=0, log=tmp_path / "short.server.log")
    with sample_usage(server) as probe:
        child.wait(30)
    block = probe.over()
    assert block.window_s is None
    start, end = probe.cpu[0].at, probe.cpu[-1].at
    with pytest.raises(ValueError, match="not inside the sampled block"):
        probe.over((start - 1, end))
    with pytest.raises(ValueError, match="not inside the sampled block"):
        probe.over((start, end + 1))


def test_a_counter_grows_linearly_between_its_readings() -> None:
    """Read at 0, 1 and 2 s: 0, 0 and 2 CPU seconds. Half of the second second's 2 s fall after 1.5 s."""
    times, counter = [0.0, 1.0, 2.0], [0.0, 0.0, 2.0]
    assert _growth(times, counter, (0.0, 2.0)) == pytest.approx(2.0)
    assert _growth(times, counter, (1.5, 2.0)) == pytest.approx(1.0)
    assert _growth(times, counter, (0.25, 1.0)) == pytest.approx(0.0)
    assert _growth(times, counter, (0.5, 1.25)) == pytest.approx(0.5)


def test_the_gpu_figure_is_the_mean_of_the_samples_inside_the_window() -> None:
    samples = [(0.1, 90.0), (0.2, 10.0), (0.3, 20.0), (0.4, 90.0)]
    assert _mean_inside(samples, (0.15, 0.35)) == pytest.approx(15.0)
    assert _mean_inside(samples, (0.0, 1.0)) == pytest.approx(52.5)
    assert _mean_inside(samples, (0.5, 1.0)) is None
