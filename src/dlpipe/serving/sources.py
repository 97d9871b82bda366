"""Where served models come from: the MLflow registry, or local packages (tests, `--package`).

A source answers two blocking questions, asked off the event loop:
`plan()` -- the `dlpipe.routing.RoutingPlan` (which versions to serve and how to route between
them) -- and `fetch(version)` -- the local package directory of a version.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

from dlpipe.routing import ABTestConfig, Heartbeat, RoutingPlan, RoutingState
from dlpipe.tracking.package import METADATA_FILE


class ModelSource(Protocol):
    model_name: str

    def plan(self) -> RoutingPlan: ...

    def fetch(self, version: str) -> Path: ...


class LocalSource:
    """Serve package directories (or `.onnx` files) from disk; routing set in code (tests, CLI)."""

    def __init__(
        self, model_name: str, packages: dict[str, str | Path], default_version: str | None = None
    ) -> None:
        if not packages:
            raise ValueError("LocalSource needs at least one package")
        self.model_name = model_name
        self._lock = threading.Lock()
        self._packages = {str(v): Path(p) for v, p in packages.items()}
        champion = default_version or next(reversed(self._packages))
        self._plan = RoutingPlan(model_name, RoutingState(champion=str(champion)))

    @classmethod
    def from_path(cls, model_name: str, path: str | Path) -> LocalSource:
        """One package; its version is the one in its metadata.json, else "1"."""
        p = Path(path)
        version = "1"
        meta = (p if p.is_dir() else p.parent) / METADATA_FILE
        if meta.is_file():
            from dlpipe.tracking.metadata import ModelMetadata

            version = ModelMetadata.from_json(meta.read_text()).version or "1"
        return cls(model_name, {version: p})

    def add_package(self, version: str, path: str | Path) -> None:
        with self._lock:
            self._packages[str(version)] = Path(path)

    def set_plan(self, champion: str, ab: ABTestConfig | None = None) -> None:
        """Route to `champion` (promote / rollback), or split traffic when `ab` is given."""
        with self._lock:
            plan = RoutingPlan(self.model_name, RoutingState(champion=str(champion), ab=ab))
            unknown = sorted(plan.versions - set(self._packages))
            if unknown:
                raise ValueError(f"unknown version(s) {unknown}; known: {sorted(self._packages)}")
            self._plan = plan

    def plan(self) -> RoutingPlan:
        with self._lock:
            return self._plan

    def fetch(self, version: str) -> Path:
        with self._lock:
            if version not in self._packages:
                raise KeyError(f"version {version!r} of {self.model_name!r} is not known")
            return self._packages[version]


class RegistrySource:
    """Follow the MLflow registry: A/B config, else the champion alias, else the latest version.

    `routing_state` is the registry's cached read (`dlpipe.routing.RoutingCache`), so polling
    it every second costs a file read, not a database query.
    """

    def __init__(self, model_name: str, tracking_uri: str | None = None) -> None:
        from dlpipe.tracking.registry_reader import RegistryReader

        self.model_name = model_name
        self.registry = RegistryReader(tracking_uri)
        self._pruned = False

    def plan(self) -> RoutingPlan:
        state = self.registry.routing_state(self.model_name)
        if not state.serving_versions():
            raise LookupError(f"model {self.model_name!r} has no versions in the registry")
        return RoutingPlan(self.model_name, state)

    def fetch(self, version: str) -> Path:
        return Path(self.registry.get_model(self.model_name, version))

    def report_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Tell the registry which plan this server applies (`dlpipe.tracking.heartbeats`)."""
        from dlpipe.tracking.heartbeats import prune_heartbeats, write_heartbeat

        if not self._pruned:  # once per server: drop heartbeats of servers long dead
            prune_heartbeats(self.registry.client, self.model_name)
            self._pruned = True
        write_heartbeat(self.registry.client, self.model_name, heartbeat)

    def withdraw_heartbeat(self, server_id: str) -> None:
        from dlpipe.tracking.heartbeats import delete_heartbeat

        delete_heartbeat(self.registry.client, self.model_name, server_id)
