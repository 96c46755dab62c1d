"""The ceiling benchmark and the accuracy of the model variants on the CPU: they run and measure every bucket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import ceiling, onnx_variants


def test_ceiling_measures_every_small_bucket_on_the_cpu(
    repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The committed digits model, buckets 1, 2 and 4, every variant the CPU runs; CUDA-only ones say why not."""
    output = tmp_path / "ceiling.json"
    repository = ["--model-repository", str(repo_root / "models"), "--models", "digits"]
    ceiling.main([*repository, "--device", "cpu", "--seconds", "0.01", "--max-batch", "4", "--json", str(output)])
    document = json.loads(output.read_text())
    rows = {(row["variant"], row["batch"]): row for row in document["rows"]}
    assert set(rows) == {(variant, batch) for variant in ("server", "fp32", "iobinding") for batch in (1, 2, 4)}
    assert not any(row["fp16"] for row in rows.values())
    assert all(row["images_per_s"] > 0 and row["runs"] >= 20 for row in rows.values())
    assert all(row["providers"] == ["CPUExecutionProvider"] for row in rows.values())
    assert rows["iobinding", 4]["max_abs_diff"] < 1e-5, "the bound buffers must hold the same batch and result"
    printed = capsys.readouterr().out
    assert "skipping cudagraph on the CPU: CUDA graphs are a CUDA provider feature" in printed
    assert "skipping pinned on the CPU: page-locked host memory speeds copies to a GPU" in printed
    assert f"onnxruntime {document['onnxruntime']}, --device cpu, providers ['CPUExecutionProvider']" in printed


def test_accuracy_runs_on_a_few_mnist_digits(
    repo_root: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every variant is scored on the same held-out digits; the table gives each accuracy and its difference."""
    repository = ["--model-repository", str(repo_root / "models"), "--models", "digits"]
    onnx_variants.main(["accuracy", *repository, "--data-dir", str(data_dir), "--device", "cpu", "--limit", "100"])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("digits")]
    _, images, _, fp32, fp16, nhwc, fp16_points, nhwc_points = line.split()
    assert int(images) == 100
    assert min(float(fp32), float(fp16), float(nhwc)) > 0.95
    assert float(fp16_points) == pytest.approx(100 * (float(fp16) - float(fp32)), abs=0.01)
    assert float(nhwc_points) == pytest.approx(100 * (float(nhwc) - float(fp32)), abs=0.01)


def test_instances_are_kept_busy_at_once_where_the_server_could_run_them(repo_root: Path, tmp_path: Path) -> None:
    """--instances 1 2: the served variants run at one and at two instances, two on two threads, each its
    minimum of runs; the variants bound to one session run once, at one."""
    output = tmp_path / "ceiling.json"
    repository = ["--model-repository", str(repo_root / "models"), "--models", "digits"]
    ceiling.main(
        [*repository, "--device", "cpu", "--variants", "server", "iobinding", "--seconds", "0.01", "--max-batch", "2",
         "--instances", "1", "2", "--json", str(output)]
    )  # fmt: skip
    rows = json.loads(output.read_text())["rows"]
    assert sorted((row["variant"], row["instances"], row["batch"]) for row in rows) == [
        ("iobinding", 1, 1), ("iobinding", 1, 2),
        ("server", 1, 1), ("server", 1, 2), ("server", 2, 1), ("server", 2, 2),
    ]  # fmt: skip
    for row in rows:
        assert row["runs"] >= 20 * row["instances"], "every instance ran its own minimum"
        assert row["images_per_s"] > 0
    assert max(row["max_abs_diff"] for row in rows if row["variant"] == "iobinding") < 1e-5
