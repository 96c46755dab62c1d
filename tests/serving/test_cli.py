"""The ``classify`` CLI, run as a program against real servers: files, folders, globs, stdin, errors, commands."""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from PIL import Image

from tests.serving.conftest import REPO_ROOT, SMALL_BATCHING, ServerProcess, free_port, write_repository
from tests.serving.test_tls import Pki, pki  # noqa: F401  (the fixture: fresh CA, server and client certificates)
from training.mnist import MnistSplit

CLI_TIMEOUT = 60.0
CLASSIFY_ENV = ("CLASSIFY_SERVER", "CLASSIFY_TLS_CA", "CLASSIFY_TLS_CLIENT_CERT", "CLASSIFY_TLS_CLIENT_KEY")


@dataclass(frozen=True)
class Result:
    """A finished ``classify`` run."""

    status: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]

    def table(self) -> dict[str, list[tuple[str, float]]]:
        """Rows of the default output by input, each input's (label, score) rows in order; checks the header."""
        header, *lines = self.stdout.splitlines()
        assert header.split() == ["PATH", "LABEL", "SCORE"]
        rows: dict[str, list[tuple[str, float]]] = {}
        name = ""
        for line in lines:
            cells = line.split()
            if not line.startswith(" "):  # an input's first row names it; its other top-k rows leave it blank
                name, cells = cells[0], cells[1:]
                rows[name] = []
            rows[name].append((cells[0], float(cells[1])) if cells[0] != "error" else (" ".join(cells), 0.0))
        return rows


def classify(
    *args: str | Path, stdin: bytes = b"", env: Mapping[str, str] | None = None, cwd: Path = REPO_ROOT
) -> Result:
    """Run the CLI as a separate program, with no CLASSIFY_* variables from the test's own environment."""
    environ = {k: v for k, v in os.environ.items() if k not in CLASSIFY_ENV}
    process = subprocess.run(
        [sys.executable, "-m", "serving.client.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env={**environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        timeout=CLI_TIMEOUT,
    )
    return Result(process.returncode, process.stdout.decode(), process.stderr.decode())


def _png(pixels: Any) -> bytes:
    data = io.BytesIO()
    Image.fromarray(pixels.squeeze()).save(data, format="PNG")
    return data.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, mnist_test_split: MnistSplit) -> dict[Path, str]:
    """24 MNIST test digits as PNG files in a folder tree (one in a subfolder, one .PNG), with their true labels.

    The folder also holds notes.txt and a hidden .scratch.png, which folder expansion must skip.
    """
    root = tmp_path_factory.mktemp("digits")
    (root / "more").mkdir()
    files = {}
    for i in range(24):
        path = root / (f"more/digit-{i:02d}.PNG" if i == 23 else f"digit-{i:02d}.png")
        path.write_bytes(_png(mnist_test_split.images[i]))
        files[path] = str(mnist_test_split.labels[i])
    (root / "notes.txt").write_text("not an image: folder expansion skips it by its extension\n")
    (root / ".scratch.png").write_text("hidden: skipped too")
    return files


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, photo_zip: Path) -> dict[Path, str]:
    """Two cat and two dog JPEG photos of the validation split, extracted from the zip as they are."""
    root = tmp_path_factory.mktemp("photos")
    files = {}
    with zipfile.ZipFile(photo_zip) as archive:
        names = sorted(name for name in archive.namelist() if PurePosixPath(name).parts[-3:-2] == ("val",))
        for label in ("cat", "dog"):
            for name in [name for name in names if PurePosixPath(name).parts[-2] == label][:2]:
                path = root / PurePosixPath(name).name
                path.write_bytes(archive.read(name))
                files[path] = label
    return files


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with one model only (digits), so ``--model`` may be left out."""
    folder = tmp_path_factory.mktemp("digits-server")
    repository = write_repository(folder / "models", {"digits": SMALL_BATCHING["digits"]})
    process = ServerProcess(["--model-repository", str(repository), "--device", "cpu"], folder / "server.log")
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


# ---- classifying -------------------------------------------------------------------------------------------------


def test_files_print_a_table_of_labels(server: ServerProcess, digits: dict[Path, str]) -> None:
    """Files named on the command line: one row each, in argument order, with the model's best label."""
    files = list(digits)[:3]
    result = classify("--server", server.address, "--model", "digits", *files)
    assert (result.status, result.stderr) == (0, "")
    table = result.table()
    assert list(table) == [str(path) for path in files]
    for path in files:
        ((label, score),) = table[str(path)]
        assert label == digits[path]
        assert 0.5 < score <= 1.0


def test_folder_is_searched_recursively_for_image_files(server: ServerProcess, digits: dict[Path, str]) -> None:
    """A folder gives its image files (subfolders and upper-case extensions too), sorted; notes.txt is skipped."""
    root = next(iter(digits)).parent
    result = classify("--server", server.address, "--model", "digits", root)
    assert (result.status, result.stderr) == (0, "")
    table = result.table()
    assert list(table) == sorted(str(path) for path in digits)  # 24 digits: two calls of up to 16 images
    assert {path: rows[0][0] for path, rows in table.items()} == {str(path): label for path, label in digits.items()}


def test_globs_are_expanded_by_the_cli(server: ServerProcess, digits: dict[Path, str]) -> None:
    """A quoted glob (no shell expands it) matches like a shell would; ``**`` reaches into subfolders."""
    root = next(iter(digits)).parent
    result = classify("--server", server.address, "--model", "digits", f"{root}/digit-0*.png", f"{root}/**/*.PNG")
    assert result.status == 0, result.stderr
    expected = [root / f"digit-{i:02d}.png" for i in range(10)] + [root / "more" / "digit-23.PNG"]
    assert list(result.table()) == [str(path) for path in expected]
    assert [rows[0][0] for rows in result.table().values()] == [digits[path] for path in expected]


def test_standard_input(server: ServerProcess, digits: dict[Path, str]) -> None:
    """``-`` reads the image bytes from standard input, and the output names it ``-``."""
    path = next(iter(digits))
    result = classify("--server", server.address, "--model", "digits", "--json", "-", stdin=path.read_bytes())
    assert result.status == 0, result.stderr
    (record,) = result.json_lines()
    assert (record["path"], record["labels"][0]["label"]) == ("-", digits[path])


def test_json_lines_match_the_table(server: ServerProcess, photos: dict[Path, str]) -> None:
    """--json: one object per input in input order, with the model, version and the table's labels and scores."""
    files = list(photos)
    table = classify("--server", server.address, "--model", "catdog", *files)
    lines = classify("--server", server.address, "--model", "catdog", "--json", *files)
    assert (table.status, lines.status) == (0, 0), table.stderr + lines.stderr
    records = lines.json_lines()
    assert [record["path"] for record in records] == [str(path) for path in files]
    for record, (path, rows) in zip(records, table.table().items(), strict=True):
        assert (record["model"], record["version"]) == ("catdog", "1")
        (label,) = record["labels"]
        assert label["label"] == rows[0][0] == photos[Path(path)]
        assert label["index"] == ("cat", "dog").index(label["label"])
        assert label["score"] == pytest.approx(rows[0][1], abs=5e-5)


def test_top_k(server: ServerProcess, digits: dict[Path, str]) -> None:
    """--top-k K: K rows per image in the table (the path on the first), K labels best first in JSON."""
    files = list(digits)[:2]
    table = classify("--server", server.address, "--model", "digits", "--top-k", "3", *files).table()
    records = classify("--server", server.address, "--model", "digits", "--top-k", "3", "--json", *files).json_lines()
    for path, record in zip(files, records, strict=True):
        rows = table[str(path)]
        assert len(rows) == len(record["labels"]) == 3
        assert [label["label"] for label in record["labels"]] == [label for label, _ in rows]
        scores = [label["score"] for label in record["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert rows[0][0] == digits[path]
        assert len({label["index"] for label in record["labels"]}) == 3


def test_a_bad_file_fails_alone(server: ServerProcess, digits: dict[Path, str], tmp_path: Path) -> None:
    """A text file named .jpg in the middle of a multi-image call: its error line, the others' labels, exit 1."""
    broken = tmp_path / "notes.jpg"
    broken.write_text("a shopping list, not a photo")
    files = list(digits)[:12]
    arguments = [*files[:5], broken, *files[5:]]  # one call holds all 13 (digits takes 16 per batch here)
    table = classify("--server", server.address, "--model", "digits", *arguments)
    lines = classify("--server", server.address, "--model", "digits", "--json", *arguments)
    assert (table.status, lines.status) == (1, 1)
    assert "1 of 13 inputs failed" in table.stderr
    records = lines.json_lines()
    assert [record["path"] for record in records] == [str(path) for path in arguments]
    error = records[5]["error"]
    assert set(records[5]) == {"path", "error"}
    assert error["code"] == "INVALID_ARGUMENT"
    assert "unrecognised image data" in error["message"]
    assert not error["message"].startswith("image ")  # sent alone, it is named by its path, not "image 0"
    assert [record["labels"][0]["label"] for record in records if "labels" in record] == [digits[f] for f in files]
    rows = table.table()
    assert rows[str(broken)][0][0].startswith("error INVALID_ARGUMENT: unrecognised image data")
    assert [rows[str(path)][0][0] for path in files] == [digits[path] for path in files]


def test_missing_paths_are_reported_in_place(server: ServerProcess, digits: dict[Path, str], tmp_path: Path) -> None:
    """A missing file, a glob matching nothing and a folder without images: NOT_FOUND lines, exit 1."""
    (tmp_path / "empty").mkdir()
    present = next(iter(digits))
    arguments: list[str | Path] = [tmp_path / "missing.png", present, f"{tmp_path}/none-*.png", tmp_path / "empty"]
    result = classify("--server", server.address, "--model", "digits", "--json", *arguments)
    assert result.status == 1
    records = result.json_lines()
    assert [record["path"] for record in records] == [str(argument) for argument in arguments]
    assert [record.get("error", {}).get("code") for record in records] == ["NOT_FOUND", None, "NOT_FOUND", "NOT_FOUND"]
    assert records[1]["labels"][0]["label"] == digits[present]


def test_the_only_model_needs_no_model_flag(digits_server: ServerProcess, digits: dict[Path, str]) -> None:
    """With one model served, --model may be left out; the address may come from CLASSIFY_SERVER."""
    path = next(iter(digits))
    result = classify("--json", path, env={"CLASSIFY_SERVER": digits_server.address})
    assert result.status == 0, result.stderr
    (record,) = result.json_lines()
    assert (record["model"], record["labels"][0]["label"]) == ("digits", digits[path])


def test_model_is_required_when_several_are_served(server: ServerProcess, digits: dict[Path, str]) -> None:
    """No --model against a server of two models: exit 2 and the served models listed."""
    result = classify("--server", server.address, next(iter(digits)))
    assert (result.status, result.stdout) == (2, "")
    assert "--model" in result.stderr
    assert "catdog, digits" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "faces"], "has no model 'faces'; it serves catdog, digits"),
        (["--model", "digits", "--version", "7"], "model 'digits' has no version '7'; versions served: 1"),
        (["--model", "digits", "--top-k", "11"], "--top-k 11: model 'digits' has only 10 labels"),
        (["--model", "digits", "--top-k", "0"], "--top-k: must be at least 1, got 0"),
        (["--model", "digits", "--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_usage_errors_exit_2(server: ServerProcess, digits: dict[Path, str], flags: list[str], message: str) -> None:
    """Mistakes in the flags stop before any image is sent, with a message that names the flag and the choices."""
    result = classify("--server", server.address, *flags, next(iter(digits)))
    assert (result.status, result.stdout) == (2, "")
    assert message in result.stderr


def test_unreachable_server_says_where_and_what_to_do(digits: dict[Path, str]) -> None:
    """Nothing listening: exit 2 with the address tried, the reason, and how to start a server."""
    address = f"127.0.0.1:{free_port()}"
    result = classify("--server", address, next(iter(digits)))
    assert (result.status, result.stdout) == (2, "")
    assert result.stderr == (
        f"classify: cannot reach a classify server at {address} (connection refused); "
        "start one with `classify-server` or pass --server HOST:PORT\n"
    )


def test_a_file_named_like_a_command_is_a_path(server: ServerProcess, digits: dict[Path, str], tmp_path: Path) -> None:
    """``classify models`` lists models, so a file named ``models`` is written as ``./models``."""
    path = next(iter(digits))
    shutil.copy(path, tmp_path / "models")
    result = classify("--server", server.address, "--model", "digits", "./models", cwd=tmp_path)
    assert result.status == 0, result.stderr
    ((label, _),) = result.table()["./models"]
    assert label == digits[path]


def test_progress_bar_on_a_terminal_leaves_stdout_clean(server: ServerProcess, digits: dict[Path, str]) -> None:
    """With stderr on a terminal the progress bar is set up (it shows once a run passes a second); stdout, redirected,
    still holds only the JSON lines, and the terminal no traceback."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "serving.client.cli", "--server", server.address, "--model", "digits", "--json",
             *map(str, digits)],
            stdout=subprocess.PIPE, stderr=terminal, cwd=REPO_ROOT, timeout=CLI_TIMEOUT,
        )  # fmt: skip
        os.set_blocking(controller, False)
        try:
            on_terminal = os.read(controller, 1 << 16).decode(errors="replace")
        except BlockingIOError:  # nothing was written there
            on_terminal = ""
    finally:
        os.close(terminal)
        os.close(controller)
    assert process.returncode == 0, on_terminal
    assert "Traceback" not in on_terminal
    records = [json.loads(line) for line in process.stdout.decode().splitlines()]
    assert [record["path"] for record in records] == [str(path) for path in digits]


# ---- models and health -------------------------------------------------------------------------------------------


def test_models_table_and_json(server: ServerProcess) -> None:
    """``classify models`` lists every model with versions, readiness, input and labels; --json as JSON Lines."""
    table = classify("--server", server.address, "models")  # common flags may come before the command
    lines = classify("models", "--server", server.address, "--json")
    assert (table.status, lines.status) == (0, 0), table.stderr + lines.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["NAME", "VERSIONS", "READY", "INPUT", "MAX", "BATCH", "LABELS"]
    assert [row.split() for row in rows] == [
        ["catdog", "1", "yes", "224x224x3", "UINT8", "NHWC", "4", "cat,", "dog"],
        ["digits", "1", "yes", "28x28x1", "UINT8", "NHWC", "16", *[f"{d}," for d in range(9)], "9"],
    ]
    catdog, digits = lines.json_lines()
    assert catdog == {
        "name": "catdog",
        "versions": ["1"],
        "ready": True,
        "input": {"height": 224, "width": 224, "channels": 3, "dtype": "UINT8", "layout": "NHWC"},
        "labels": ["cat", "dog"],
        "max_batch_size": 4,
    }
    assert (digits["name"], digits["labels"]) == ("digits", [str(d) for d in range(10)])


def test_health_serving(server: ServerProcess) -> None:
    """``classify health`` prints SERVING and exits 0: what the container's HEALTHCHECK runs."""
    result = classify("health", "--server", server.address)
    assert (result.status, result.stdout, result.stderr) == (0, "SERVING\n", "")


def test_health_ignores_the_server_certificate_variables(server: ServerProcess) -> None:
    """In the server's container CLASSIFY_TLS_CERT/KEY name the server's own files: the client must not take them."""
    env = {"CLASSIFY_TLS_CERT": "/nonexistent/server.crt", "CLASSIFY_TLS_KEY": "/nonexistent/server.key"}
    result = classify("health", "--server", server.address, env=env)
    assert (result.status, result.stdout) == (0, "SERVING\n"), result.stderr


@pytest.mark.parametrize("command", ["health", "models"])
def test_commands_against_a_free_port_exit_2(command: str) -> None:
    """No server at the address: exit 2 with the same helpful message as classifying."""
    address = f"127.0.0.1:{free_port()}"
    result = classify(command, "--server", address)
    assert (result.status, result.stdout) == (2, "")
    assert f"cannot reach a classify server at {address} (connection refused)" in result.stderr


# ---- TLS ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:  # noqa: F811
    """Mutual TLS: only clients with a certificate from the test CA are served."""
    folder = tmp_path_factory.mktemp("mtls-cli")
    repository = write_repository(folder / "models", {"digits": SMALL_BATCHING["digits"]})
    tls = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    process = ServerProcess(
        ["--model-repository", str(repository), "--device", "cpu", "--health-port", str(free_port()), *tls],
        folder / "server.log",
    )
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


def test_mutual_tls_by_flags_and_by_variables(
    mtls_server: ServerProcess,
    pki: Pki,  # noqa: F811
    digits: dict[Path, str],
) -> None:
    """--tls-ca/--tls-cert/--tls-key (or CLASSIFY_TLS_CA/_CLIENT_CERT/_CLIENT_KEY) reach a mutual-TLS server."""
    path = next(iter(digits))
    flags: list[str | Path] = ["--tls-ca", pki.ca, "--tls-cert", pki.client_cert, "--tls-key", pki.client_key]
    result = classify("--server", mtls_server.address, *flags, "--json", path)
    assert result.status == 0, result.stderr
    assert result.json_lines()[0]["labels"][0]["label"] == digits[path]
    env = {"CLASSIFY_TLS_CA": str(pki.ca), "CLASSIFY_TLS_CLIENT_CERT": str(pki.client_cert)}
    env["CLASSIFY_TLS_CLIENT_KEY"] = str(pki.client_key)
    health = classify("health", "--server", mtls_server.address, env=env)
    assert (health.status, health.stdout) == (0, "SERVING\n"), health.stderr
    plaintext = classify("health", "--server", mtls_server.address)
    assert plaintext.status == 2
    assert f"cannot connect to the server at {mtls_server.address}" in plaintext.stderr
    assert "--tls-ca" in plaintext.stderr


# ---- the program -------------------------------------------------------------------------------------------------


def test_console_script_help() -> None:
    """The installed ``classify`` script runs; its help shows both forms of the command line and the commands."""
    script = Path(sys.executable).parent / "classify"
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=CLI_TIMEOUT, check=True)
    assert result.stdout.startswith("usage: classify [OPTIONS] PATH...\n       classify {models,health,bench}")
    for text in ("--server HOST:PORT", "CLASSIFY_SERVER", "--top-k K", "--json", "classify models", "exit status"):
        assert text in result.stdout
