"""plan_runs: the fastest bucket runs that cover each batch size, within the rows a buffer holds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from serving.bucket_plan import plan_runs
from serving.runtime import batch_buckets

COMPUTE_BOUND = {bucket: 0.001 + 0.0001 * bucket for bucket in batch_buckets(128)}  # cost grows with the rows
LAUNCH_BOUND = {bucket: 0.0003 for bucket in batch_buckets(1024)}  # every run costs the same


def test_every_plan_covers_its_batch_and_reads_no_more_than_the_buffer_holds() -> None:
    for seconds, max_rows in ((COMPUTE_BOUND, 128), (LAUNCH_BOUND, 1024), ({1: 1.0, 8: 2.0, 12: 2.5}, 12)):
        plans = plan_runs(seconds, max_rows)
        assert plans[0] == ()
        for count in range(1, max_rows + 1):
            assert count <= sum(plans[count]) <= max_rows
            assert set(plans[count]) <= set(seconds)
            assert list(plans[count]) == sorted(plans[count], reverse=True), "the padding falls in the last run"


def test_a_compute_bound_model_splits_instead_of_padding() -> None:
    plans = plan_runs(COMPUTE_BOUND, 128)
    assert plans[70] == (64, 8)
    assert plans[128] == (128,)


def test_a_launch_bound_model_pads_to_one_run() -> None:
    plans = plan_runs(LAUNCH_BOUND, 1024)
    assert plans[70] == (128,)
    assert plans[1000] == (1024,)
    assert plans[1] == (1,), "among runs that cost the same, the one that reads fewest rows"


def test_each_plan_is_the_fastest_of_all_bucket_combinations() -> None:
    rng = np.random.default_rng(3)
    buckets = batch_buckets(12)
    for _ in range(20):
        seconds = {bucket: float(rng.uniform(0.1, 1.0)) for bucket in buckets}
        plans = plan_runs(seconds, 12)
        for count in range(1, 13):
            fastest = min(
                sum(seconds[b] for b in runs)
                for size in range(1, 13)
                for runs in itertools.combinations_with_replacement(buckets, size)
                if count <= sum(runs) <= 12
            )
            assert sum(seconds[b] for b in plans[count]) == pytest.approx(fastest)
