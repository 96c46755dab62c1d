"""Per-worker shares of a run, summed up: idle workers, and how much of a request's time the handlers took."""

from __future__ import annotations

import pytest

from benchmarks.worker_metrics import decode_split, engine_split, first_instance_share, idle_workers, inside_server

_BUSY = {"requests": 300, "request_ms": 10.0}
_LIGHT = {"requests": 100, "request_ms": 2.0}
_IDLE = {"requests": 0, "request_ms": None}


def test_the_time_inside_is_weighted_by_each_workers_requests() -> None:
    """(300 x 10 + 100 x 2) / 400 = 8 ms inside, of a 32 ms mean at the client: a quarter."""
    assert inside_server([_BUSY, _LIGHT, _IDLE], client_mean_ms=32.0) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("shares", "client_mean_ms"),
    [([], 5.0), ([_IDLE], 5.0), ([_BUSY], None)],
    ids=["no-metrics", "nothing-answered", "no-client-mean"],
)
def test_without_requests_or_a_client_mean_there_is_no_share(
    shares: list[dict[str, float | None]], client_mean_ms: float | None
) -> None:
    assert inside_server(shares, client_mean_ms) is None


def test_idle_workers_are_those_that_answered_nothing() -> None:
    assert idle_workers([_BUSY, _IDLE, _LIGHT, _IDLE]) == 2
    assert idle_workers([]) is None


def test_the_engine_split_is_weighted_by_each_workers_batches() -> None:
    """300 batches at 4 ms and 100 at 2 ms wait 3.5 ms on average, not the 3 ms of the workers' plain mean."""
    first = {"engine_batches": 300, "engine_wait_ms": 4.0, "engine_run_ms": 10.0, "engine_infer_ms": 8.0,
             "engine_run_images": 60.0}  # fmt: skip
    second = {"engine_batches": 100, "engine_wait_ms": 2.0, "engine_run_ms": 6.0, "engine_infer_ms": 4.0,
              "engine_run_images": 20.0}  # fmt: skip
    assert engine_split([first, second, _IDLE]) == pytest.approx((3.5, 9.0, 7.0, 50.0))


def test_without_the_engine_or_its_models_part_there_is_no_engine_split() -> None:
    """One worker runs its sessions itself: its shares carry no engine figures. An engine that does not report
    the model's part of a run (a server before it did) gives no split rather than a zero for that part."""
    alone = {"engine_batches": 0, "engine_wait_ms": None, "engine_run_ms": None, "engine_infer_ms": None,
             "engine_run_images": None}  # fmt: skip
    assert engine_split([alone]) is None
    assert engine_split([]) is None
    older = {"engine_batches": 300, "engine_wait_ms": 4.0, "engine_run_ms": 10.0, "engine_infer_ms": None,
             "engine_run_images": 60.0}  # fmt: skip
    assert engine_split([older]) is None


def test_the_decode_split_is_weighted_by_each_workers_images() -> None:
    """3,000 images waiting 8 ms and 1,000 waiting 0 wait 6 ms on average; a worker that decoded nothing (raw
    pixels only) has no say, and where no worker decoded there is no split."""
    first = {"decoded": 3000, "decode_wait_ms": 8.0, "decode_ms": 2.0, "decode_cpu_ms": 0.8}
    second = {"decoded": 1000, "decode_wait_ms": 0.0, "decode_ms": 1.0, "decode_cpu_ms": 0.8}
    raw_only = {"decoded": 0, "decode_wait_ms": None, "decode_ms": None, "decode_cpu_ms": None}
    assert decode_split([first, second, raw_only]) == pytest.approx((6.0, 1.75, 0.8))
    assert decode_split([raw_only]) is None


def test_the_first_instance_share_counts_batches_over_all_workers() -> None:
    """300 of 400 batches and 20 of 100 went to instance 0: 320 of 500. Without the engine, or from a server that
    does not count batches by instance, there is no share (not 0)."""
    busy = {"engine_batches": 400, "engine_labelled_batches": 400, "engine_first_instance_batches": 300}
    light = {"engine_batches": 100, "engine_labelled_batches": 100, "engine_first_instance_batches": 20}
    assert first_instance_share([busy, light, _IDLE]) == pytest.approx(0.64)
    assert first_instance_share([{"engine_batches": 0, "engine_labelled_batches": 0}]) is None
    unlabelled = {"engine_batches": 400, "engine_labelled_batches": 0, "engine_first_instance_batches": 0}
    assert first_instance_share([unlabelled]) is None
