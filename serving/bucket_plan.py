"""Which bucket runs a batch of N images takes: the set of fixed-shape runs that covers it fastest.

Padding a batch of 70 up to 128 makes a compute-bound model (cat/dog) do 58 images of wasted work: on an H200
a run of 128 takes 14.4 ms where 64 and then 8 take 7.4 + 1.4 ms. A launch-bound model (digits) is the
other way round: one padded run beats two. So the choice follows each bucket's measured run time.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["plan_runs"]


def plan_runs(seconds: Mapping[int, float], max_rows: int) -> list[tuple[int, ...]]:
    """For every count 0..``max_rows``, the buckets to run (largest first) that cover it in the least time.

    Args:
        seconds: the run time of each bucket size.
        max_rows: the most rows the runs may read together (the batch buffers hold this many).
    """
    inf = float("inf")
    none: tuple[int, ...] = ()
    # exact[c]: the fastest runs that read exactly c rows; ties go to fewer runs
    exact = [(0.0, none)] + [(inf, none)] * max_rows
    for rows in range(1, max_rows + 1):
        for bucket, time in seconds.items():
            if bucket <= rows and exact[rows - bucket][0] < inf:
                before, runs = exact[rows - bucket]
                candidate = (before + time, tuple(sorted((*runs, bucket), reverse=True)))
                if (candidate[0], len(candidate[1])) < (exact[rows][0], len(exact[rows][1])):
                    exact[rows] = candidate
    plans = [none] * (max_rows + 1)
    best = (inf, none)
    for rows in range(max_rows, 0, -1):  # covering ``rows`` may read more: the best of every exact plan above it
        if (exact[rows][0], len(exact[rows][1])) <= (best[0], len(best[1])):
            best = exact[rows]
        plans[rows] = best[1]
    return plans
