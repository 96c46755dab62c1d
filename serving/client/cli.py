"""``classify``: classify images with a classify server, list its models, check its health, or load it (bench).

``classify PATH...`` is the default command; ``classify models``, ``classify health`` and ``classify bench``
are named by the first argument that is neither an option nor an option's value. Only what the command
needs is imported (after ``main`` has quietened gRPC's own logging), so ``classify health``, a container's
HEALTHCHECK, starts quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from serving.protos.classify.v1 import classify_pb2 as pb

__all__ = ["COMMANDS", "ClientError", "main"]

COMMANDS = ("models", "health", "bench")
DEFAULT_ADDRESS = "localhost:8001"
DEFAULT_TIMEOUT = 30.0  # seconds per call, when --timeout is not given (bench has its own rule)
ENV_SERVER = "CLASSIFY_SERVER"
ENV_TLS_CA = "CLASSIFY_TLS_CA"
# Not CLASSIFY_TLS_CERT/KEY: classify-server reads those for its own certificate, and `classify health` runs in
# the server's container, where they are set.
ENV_TLS_CERT = "CLASSIFY_TLS_CLIENT_CERT"
ENV_TLS_KEY = "CLASSIFY_TLS_CLIENT_KEY"
_MAX_IMAGES_PER_CALL = 32
_MAX_BYTES_PER_CALL = 16 << 20  # well below the server's default 64 MiB message limit
_CALLS_IN_FLIGHT = 4
_EXIT_USAGE = 2


class ClientError(Exception):
    """The command cannot run as asked (no --model for a server with several, server unreachable): exit 2."""


# ---- arguments -------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text!r}")
    return value


def _from_env(name: str) -> str | None:
    return os.environ.get(name) or None


def _common_parser() -> argparse.ArgumentParser:
    """The flags every command takes (bench too): where the server is, how to reach it, how long to wait."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=_from_env(ENV_SERVER) or DEFAULT_ADDRESS,
        help=f"the classify server's gRPC address [{ENV_SERVER}; default: {DEFAULT_ADDRESS}]",
    )
    group.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_seconds,
        help=f"seconds to wait for each call [default: {DEFAULT_TIMEOUT:g}; bench: see its --help]",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        type=Path,
        default=_from_env(ENV_TLS_CA),
        help=f"CA certificates that signed the server's certificate; turns TLS on [{ENV_TLS_CA}]",
    )
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        type=Path,
        default=_from_env(ENV_TLS_CERT),
        help=f"client certificate chain, for a server that asks for one (mutual TLS) [{ENV_TLS_CERT}]",
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        type=Path,
        default=_from_env(ENV_TLS_KEY),
        help=f"the private key of --tls-cert [{ENV_TLS_KEY}]",
    )
    return common


_EPILOG = """\
other commands (`classify COMMAND --help` for their options):
  classify models    list the served models: versions, readiness, input, labels
  classify health    check the server's gRPC health: exit 0 only when SERVING
  classify bench     measure a model's throughput and latency under load

folders give their image files, recursively, by extension (png, jpg, jpeg, bmp, gif, webp, tif, tiff; hidden
files skipped); a file named explicitly is sent whatever its name. Globs are expanded here too (quote them to
use ** across folders). To classify a file named like a command, write it as a path: classify ./models

--json writes {"path", "model", "version", "labels": [{"label", "index", "score"}, ...]} per input, or
{"path", "error": {"code", "message"}} for one that failed: a gRPC status name, NOT_FOUND for a missing file.

exit status: 0 every input classified; 1 some inputs failed (the others are still printed); 2 usage error, or
the server cannot be reached."""


def _classify_parser(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="classify",
        usage="classify [OPTIONS] PATH...\n       classify {models,health,bench} [OPTIONS]",
        description="Classify image files with a model of a classify server: a table of the most likely labels, "
        "or JSON Lines. Many files go out as concurrent multi-image requests.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
        allow_abbrev=False,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="an image file, a folder, a glob, or - for standard input"
    )
    parser.add_argument("--model", metavar="NAME", help="the model; optional when the server serves only one")
    parser.add_argument("--version", metavar="V", default="", help="the model version [default: the newest ready]")
    parser.add_argument(
        "--top-k", metavar="K", type=_positive_int, help="labels per image, the most likely first [default: 1]"
    )
    parser.add_argument(
        "--json", action="store_true", help="JSON Lines on stdout: one object per input, in input order"
    )
    parser.set_defaults(func=_run_classify)
    return parser


def _command_parser(common: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser for ``classify COMMAND``, with only that command registered (nothing else gets imported)."""
    parser = argparse.ArgumentParser(prog="classify", allow_abbrev=False)
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    if command == "models":
        models = subparsers.add_parser(
            "models",
            parents=[common],
            allow_abbrev=False,
            help="list the served models",
            description="List the server's models (ListModels): versions, readiness, input, max batch size, labels. "
            "Exit status: 0 listed; 2 the server cannot be reached.",
        )
        models.add_argument("--json", action="store_true", help="JSON Lines: one object per model")
        models.set_defaults(func=_run_models)
    elif command == "health":
        health = subparsers.add_parser(
            "health",
            parents=[common],
            allow_abbrev=False,
            help="check the server's health",
            description='Ask the server\'s grpc.health.v1 service (Check, service "") and print the status. '
            "Exit status: 0 SERVING; 1 any other status; 2 the server cannot be reached.",
        )
        health.set_defaults(func=_run_health)
    elif command == "bench":
        from serving.client.bench import add_bench_parser  # numpy and image decoding: only for bench

        add_bench_parser(subparsers, common)
    return parser


def _split_command(arguments: list[str], parser: argparse.ArgumentParser) -> tuple[str | None, list[str]]:
    """The command named by the first argument that is not an option or an option's value, and the arguments
    with that name moved to the front; no command (None) when that argument is a path."""
    takes_value = {option for option, action in parser._option_string_actions.items() if action.nargs != 0}
    position = 0
    while position < len(arguments):
        argument = arguments[position]
        if argument == "--":
            break
        if argument.startswith("-") and argument != "-":
            position += 2 if argument in takes_value else 1
            continue
        if argument in COMMANDS:
            return argument, [argument, *arguments[:position], *arguments[position + 1 :]]
        break
    return None, arguments


# ---- the commands ----------------------------------------------------------------------------------------------


def _timeout(args: argparse.Namespace) -> float:
    return DEFAULT_TIMEOUT if args.timeout is None else float(args.timeout)


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    from serving.client.connection import CredentialsError, open_channel

    try:
        return open_channel(args.server, args.tls_ca, args.tls_cert, args.tls_key)
    except CredentialsError as exc:
        raise ClientError(str(exc)) from None


async def _list_models(stub: Any, args: argparse.Namespace) -> list[pb.ModelInfo]:
    """ListModels: the first call of ``classify`` and ``classify models``, so it is the one that finds no server."""
    import grpc

    from serving.client.connection import failure_message
    from serving.protos.classify.v1 import classify_pb2

    try:
        response = await stub.ListModels(classify_pb2.ListModelsRequest(), timeout=_timeout(args))
    except grpc.aio.AioRpcError as error:
        raise ClientError(failure_message(args.server, error, _timeout(args))) from None
    return list(response.models)


def _choose_model(models: Sequence[pb.ModelInfo], args: argparse.Namespace) -> pb.ModelInfo:
    """The model (a ``ModelInfo``) to classify with: ``--model``, or the only one served; checks version and top-k."""
    names = ", ".join(model.name for model in models) or "none"
    if args.model is None:
        if len(models) == 1:
            return models[0]
        raise ClientError(f"choose a model with --model NAME: the server at {args.server} serves {names}")
    chosen = next((model for model in models if model.name == args.model), None)
    if chosen is None:
        raise ClientError(f"the server at {args.server} has no model {args.model!r}; it serves {names}")
    if args.version and args.version not in chosen.versions:
        versions = ", ".join(chosen.versions) or "none"
        raise ClientError(f"model {chosen.name!r} has no version {args.version!r}; versions served: {versions}")
    if args.top_k is not None and chosen.labels and args.top_k > len(chosen.labels):
        raise ClientError(f"--top-k {args.top_k}: model {chosen.name!r} has only {len(chosen.labels)} labels")
    return chosen


async def _classify(args: argparse.Namespace, stdin: bytes) -> int:
    from serving.client.calls import CallPlan, classify_inputs
    from serving.client.inputs import expand_arguments
    from serving.client.output import OutcomePrinter
    from serving.protos.classify.v1 import classify_pb2_grpc

    inputs = expand_arguments(args.paths)
    async with _channel(args) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        model = _choose_model(await _list_models(stub, args), args)
        batch = model.max_batch_size if model.max_batch_size > 0 else _MAX_IMAGES_PER_CALL
        plan = CallPlan(
            model=model.name,
            version=args.version,
            top_k=args.top_k,
            timeout=_timeout(args),
            max_images=min(batch, _MAX_IMAGES_PER_CALL),
            max_bytes=_MAX_BYTES_PER_CALL,
            in_flight=_CALLS_IN_FLIGHT,
        )
        with OutcomePrinter(inputs, list(model.labels), as_json=args.json) as printer:
            await classify_inputs(stub, inputs, plan, stdin, printer.add)
    if printer.failed:
        print(f"classify: {printer.failed} of {len(inputs)} inputs failed", file=sys.stderr)
    return 1 if printer.failed else 0


def _run_classify(args: argparse.Namespace) -> int:
    from serving.client.inputs import STDIN

    stdin = sys.stdin.buffer.read() if STDIN in args.paths else b""
    return asyncio.run(_classify(args, stdin))


async def _models(args: argparse.Namespace) -> int:
    from serving.client.output import model_json, models_table
    from serving.protos.classify.v1 import classify_pb2_grpc

    async with _channel(args) as channel:
        models = await _list_models(classify_pb2_grpc.ClassifierStub(channel), args)
    lines = [model_json(model) for model in models] if args.json else models_table(models)
    print("\n".join(lines))
    return 0


def _run_models(args: argparse.Namespace) -> int:
    return asyncio.run(_models(args))


async def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.client.connection import failure_message

    async with _channel(args) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=_timeout(args)
            )
        except grpc.aio.AioRpcError as error:
            raise ClientError(failure_message(args.server, error, _timeout(args))) from None
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def _run_health(args: argparse.Namespace) -> int:
    return asyncio.run(_health(args))


# ---- entry point -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``classify`` command line; returns the exit status."""
    # gRPC's C core logs connection and TLS failures itself; the messages here say the same, for people.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    arguments = list(sys.argv[1:] if argv is None else argv)
    common = _common_parser()
    classify_parser = _classify_parser(common)
    command, arguments = _split_command(arguments, classify_parser)
    parser = classify_parser if command is None else _command_parser(common, command)
    args = parser.parse_args(arguments)
    try:
        status: int = args.func(args)
    except ClientError as exc:
        print(f"classify: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print("classify: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`classify ... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
