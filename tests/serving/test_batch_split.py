"""The pure merge/split bookkeeping of batches, without asyncio."""

from __future__ import annotations

import numpy as np
import pytest

from serving.batch_split import Assembly, BatchPlan, Part


def _images(first: int, count: int) -> np.ndarray:
    """``count`` 2x2x1 images whose pixels all equal their value, ``first`` onwards: rows identify themselves."""
    return np.repeat(np.arange(first, first + count, dtype=np.uint8), 4).reshape(count, 2, 2, 1)


def _plan_all(requests: list[np.ndarray], capacity: int) -> list[BatchPlan[int]]:
    """Every batch the requests make, in arrival order, as the batcher forms them under steady load."""
    plans = [BatchPlan[int](capacity)]
    for index, images in enumerate(requests):
        taken = 0
        while taken < len(images):
            if plans[-1].room == 0:
                plans.append(BatchPlan[int](capacity))
            taken = plans[-1].add(index, images, taken)
    return plans


def test_a_whole_request_goes_in_and_out_without_copies() -> None:
    images = _images(0, 3)
    plan = BatchPlan[str](capacity=8)

    assert plan.add("a", images, 0) == 3
    assert plan.parts == [Part("a", 0, 3)]
    assert (plan.rows, plan.room) == (3, 5)
    assert plan.inputs() is images
    outputs = np.zeros((3, 4), np.float32)
    [view] = plan.split(outputs)
    assert view is outputs


def test_requests_are_split_across_batches_in_order() -> None:
    plans = _plan_all([_images(0, 3), _images(3, 10), _images(13, 2)], capacity=4)

    assert [plan.parts for plan in plans] == [
        [Part(0, 0, 3), Part(1, 0, 1)],
        [Part(1, 1, 5)],
        [Part(1, 5, 9)],
        [Part(1, 9, 10), Part(2, 0, 2)],
    ]
    assert [plan.inputs()[:, 0, 0, 0].tolist() for plan in plans] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14],
    ]


def test_a_full_batch_takes_nothing() -> None:
    plan = BatchPlan[str](capacity=2)
    plan.add("a", _images(0, 2), 0)

    assert plan.add("b", _images(2, 3), 0) == 0
    assert plan.parts == [Part("a", 0, 2)]


def test_split_hands_each_part_its_rows_as_views() -> None:
    plan = BatchPlan[str](capacity=6)
    plan.add("a", _images(0, 2), 0)
    plan.add("b", _images(2, 1), 0)
    plan.add("c", _images(3, 5), 0)
    outputs = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)

    views = plan.split(outputs)

    assert [view.tolist() for view in views] == [outputs[0:2].tolist(), outputs[2:3].tolist(), outputs[3:6].tolist()]
    assert all(np.shares_memory(view, outputs) for view in views)
    assert plan.parts[2] == Part("c", 0, 3)


def test_split_rejects_a_wrong_row_count() -> None:
    plan = BatchPlan[str](capacity=4)
    plan.add("a", _images(0, 3), 0)

    with pytest.raises(ValueError, match=r"^the model returned 2 rows for a batch of 3$"):
        plan.split(np.zeros((2, 1), np.float32))


def test_drop_removes_a_part_and_its_rows() -> None:
    plan = BatchPlan[str](capacity=8)
    plan.add("a", _images(0, 2), 0)
    plan.add("b", _images(2, 3), 0)
    plan.add("c", _images(5, 1), 0)

    assert plan.drop("b") == 3
    assert plan.drop("missing") == 0
    assert plan.parts == [Part("a", 0, 2), Part("c", 0, 1)]
    assert plan.rows == 3
    assert plan.inputs()[:, 0, 0, 0].tolist() == [0, 1, 5]
    assert [len(part) for part in plan.part_inputs()] == [2, 1]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        BatchPlan[int](capacity=0)


def test_assembly_stitches_parts_arriving_in_any_order() -> None:
    assembly = Assembly(rows=5)
    expected = np.arange(10, dtype=np.float32).reshape(5, 2)

    assert assembly.add(3, expected[3:5]) is None
    assert assembly.add(0, expected[0:1]) is None
    result = assembly.add(1, expected[1:3])

    assert result is not None
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == np.float32


def test_assembly_rejects_rows_outside_the_request() -> None:
    assembly = Assembly(rows=2)

    with pytest.raises(ValueError, match=r"^rows 1:3 are outside a request of 2 rows$"):
        assembly.add(1, np.zeros((2, 1), np.float32))


@pytest.mark.parametrize("capacity", [1, 3, 7, 64])
def test_merge_run_split_and_stitch_round_trip(capacity: int) -> None:
    rng = np.random.default_rng(capacity)
    sizes = rng.integers(1, 12, size=20).tolist()
    starts = np.cumsum([0, *sizes])
    requests = [_images(int(start) % 200, size) for start, size in zip(starts, sizes, strict=False)]
    assemblies = [Assembly(len(images)) for images in requests]
    results: dict[int, np.ndarray] = {}

    plans = _plan_all(requests, capacity)
    for plan in reversed(plans):  # batches may finish out of order on several instances
        assert 1 <= plan.rows <= capacity
        outputs = plan.inputs().reshape(plan.rows, -1).astype(np.float32)
        for part, view in zip(plan.parts, plan.split(outputs), strict=True):
            result = assemblies[part.request].add(part.start, view)
            if result is not None:
                results[part.request] = result

    assert sorted(results) == list(range(len(requests)))
    for index, images in enumerate(requests):
        np.testing.assert_array_equal(results[index], images.reshape(len(images), -1).astype(np.float32))
