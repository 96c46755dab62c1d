"""The model repository: scans the folder, loads every version into runtimes and batchers, reports readiness."""

from __future__ import annotations

import asyncio
import enum
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from serving.batching import BatchObserver, DynamicBatcher
from serving.engine_client import RemoteRuntime
from serving.errors import NotFound, Unavailable
from serving.metrics import Metrics, ModelMetrics
from serving.model_config import ConfigError, ModelSpec, load_model_spec
from serving.runtime import Device, DeviceUnavailable, ModelRuntime, ProviderSelector, placement
from serving.statistics import ModelStatistics

Runtime = ModelRuntime | RemoteRuntime  # sessions in this process, or in the engine process (--workers N)

__all__ = ["IndexEntry", "ModelRepository", "ModelState", "ModelVersion"]

_log = logging.getLogger(__name__)


class ModelState(enum.Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One line of the repository index: a model (and version, once known), its state and why."""

    name: str
    version: str
    state: ModelState
    reason: str = ""


class _Fanout:
    """Feeds one batcher's reports to several observers (statistics and metrics)."""

    def __init__(self, *observers: BatchObserver) -> None:
        self.observers = observers

    def batch_done(self, batch_size: int, compute_ns: int) -> None:
        for observer in self.observers:
            observer.batch_done(batch_size, compute_ns)

    def request_done(self, images: int, queue_ns: int, total_ns: int, ok: bool) -> None:
        for observer in self.observers:
            observer.request_done(images, queue_ns, total_ns, ok)


@dataclass
class ModelVersion:
    """One loaded version: its sessions, its batcher and its statistics."""

    spec: ModelSpec
    version: int
    runtime: Runtime
    batcher: DynamicBatcher
    executor: ThreadPoolExecutor
    metrics: ModelMetrics
    statistics: ModelStatistics = field(default_factory=ModelStatistics)

    @property
    def name(self) -> str:
        return self.spec.name

    async def close(self, grace: float) -> None:
        await self.batcher.close(grace)
        self.executor.shutdown(wait=False)
        self.runtime.close()


@dataclass
class _Model:
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    state: ModelState = ModelState.LOADING
    reason: str = ""


class ModelRepository:
    """Every model folder under ``root``; ``get`` is the hot path, everything else happens rarely."""

    def __init__(
        self,
        root: Path,
        providers: ProviderSelector,
        metrics: Metrics,
        drain_grace: float = 5.0,
        engine: str | None = None,
    ) -> None:
        """``engine``: the engine process's socket (``--workers N``); the sessions live there, not here."""
        self.root = root
        self.providers = providers
        self.engine = engine
        self.metrics = metrics
        self.drain_grace = drain_grace
        self._models: dict[str, _Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._started = False

    @property
    def ready(self) -> bool:
        """Loading at start has finished and every model that can load is loaded and warmed up."""
        return (
            self._started
            and all(m.state is not ModelState.LOADING for m in self._models.values())
            and any(m.state is ModelState.READY for m in self._models.values())
        )

    def _folders(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    async def load_all(self) -> None:
        """Load every model folder; a broken one is logged with its reason and skipped, the rest serve."""
        if not self.root.is_dir():
            raise ConfigError(f"{self.root}: model repository not found")
        for name in self._folders():
            self._models.setdefault(name, _Model())
        for name in self._folders():
            try:
                await self.load(name)
            except ConfigError as exc:
                _log.error("model %s not loaded: %s", name, exc)
        self._started = True

    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` from its folder; the old versions keep serving until the new ones are warm.

        Raises:
            NotFound: no such folder. ConfigError: the folder cannot be served (also recorded in the index).
        """
        if not (self.root / name).is_dir():
            raise NotFound(f"model {name!r} not found in repository {self.root}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self._models.setdefault(name, _Model())
            try:
                versions = await self._load_versions(name)
            except DeviceUnavailable:
                raise
            except Exception as exc:  # a folder that cannot be served must not take the server down
                if not model.versions:
                    model.state, model.reason = ModelState.UNAVAILABLE, str(exc)
                raise ConfigError(str(exc)) from exc
            previous, self._models[name] = model.versions, _Model(versions=versions, state=ModelState.READY)
            for old in previous.values():
                await old.close(self.drain_grace)
            runtime = next(iter(versions.values())).runtime
            where = placement(runtime.providers, runtime.fp16)
            _log.info("model %s ready: versions %s on %s", name, sorted(versions), where)

    async def _load_versions(self, name: str) -> dict[int, ModelVersion]:
        model_dir = self.root / name
        spec = load_model_spec(model_dir)
        available = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()]
        chosen = spec.versions.select(available)
        if not chosen:
            raise ConfigError(f"{model_dir}: no version folder with a model.onnx matches the version policy")
        loop = asyncio.get_running_loop()
        loaded: dict[int, ModelVersion] = {}
        for version in chosen:
            runtime = await loop.run_in_executor(None, self._open_runtime, spec, model_dir / str(version))
            loaded[version] = self._serve(spec, version, runtime)
        return loaded

    def _open_runtime(self, spec: ModelSpec, version_dir: Path) -> Runtime:
        path = version_dir / "model.onnx"
        runtime: Runtime
        if self.engine is not None:
            runtime = RemoteRuntime(
                self.engine, path, spec.instance_count, spec.max_batch_size, spec.cpu_only, spec.gpu
            )
        else:
            providers = ProviderSelector(Device.CPU) if spec.cpu_only else self.providers
            runtime = ModelRuntime(path, spec.instance_count, spec.max_batch_size, providers, spec.gpu)
        expected = (-1, spec.input.height, spec.input.width, spec.input.channels)
        if runtime.input.name != spec.input_name or runtime.input.shape != expected:
            raise ConfigError(
                f"{version_dir / 'model.onnx'}: input {runtime.input.name} {list(runtime.input.shape)} does not "
                f"match config.pbtxt's {spec.input_name} {list(expected)}"
            )
        if runtime.output.name != spec.output_name or runtime.output.shape[1:] != (len(spec.labels),):
            raise ConfigError(
                f"{version_dir / 'model.onnx'}: output {runtime.output.name} {list(runtime.output.shape)} does not "
                f"match config.pbtxt's {spec.output_name} with {len(spec.labels)} labels"
            )
        runtime.warm_up()
        return runtime

    def _serve(self, spec: ModelSpec, version: int, runtime: Runtime) -> ModelVersion:
        statistics = ModelStatistics()
        model_metrics = self.metrics.for_model(spec.name, str(version))
        executor = ThreadPoolExecutor(spec.instance_count, thread_name_prefix=f"{spec.name}-{version}")
        batcher = DynamicBatcher(runtime.runners, spec.batching, executor, _Fanout(statistics, model_metrics))
        batcher.start()
        model_metrics.pending.set_function(lambda: batcher.queue_depth)
        if isinstance(runtime, RemoteRuntime):
            model_metrics.track_engine(spec.instance_count)
            runtime.observe_engine(model_metrics.engine_done)
        return ModelVersion(spec, version, runtime, batcher, executor, model_metrics, statistics)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get UNAVAILABLE, queued ones finish within the drain grace."""
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name!r} not found in repository {self.root}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            versions, model.versions = model.versions, {}
            model.state, model.reason = ModelState.UNAVAILABLE, "unloaded"
            for loaded in versions.values():
                await loaded.close(self.drain_grace)

    async def close(self) -> None:
        """Drain and release every model (shutdown)."""
        await asyncio.gather(*(self.unload(name) for name in list(self._models)))

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve: ``version`` if given, else the newest.

        Raises:
            NotFound: unknown model or version. Unavailable: the model is loading or unloaded.
        """
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"unknown model {name!r}; served models: {', '.join(sorted(self._models)) or 'none'}")
        if not model.versions:
            detail = f": {model.reason}" if model.reason else ""
            raise Unavailable(f"model {name!r} is {model.state.value.lower()}{detail}")
        if not version:
            return model.versions[max(model.versions)]
        if version.isdigit() and int(version) in model.versions:
            return model.versions[int(version)]
        served = ", ".join(str(v) for v in sorted(model.versions))
        raise NotFound(f"model {name!r} has no version {version!r}; versions served: {served}")

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[ModelVersion]:
        model = self._models.get(name)
        return [model.versions[v] for v in sorted(model.versions)] if model else []

    def index(self) -> list[IndexEntry]:
        entries: list[IndexEntry] = []
        for name in sorted(self._models):
            model = self._models[name]
            if model.versions:
                entries += [IndexEntry(name, str(v), ModelState.READY) for v in sorted(model.versions)]
            else:
                entries.append(IndexEntry(name, "", model.state, model.reason))
        return entries
