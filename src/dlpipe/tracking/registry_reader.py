"""`RegistryReader`: the read side of `ModelRegistry` (lookups, downloads, cached routing).

Routing reads go through a `dlpipe.routing.RoutingCache` (its staleness bound is documented
there): a change made through `ModelRegistry` on a local store is seen by every call, in any
process on the host, that starts after the change returned; changes made by other MLflow
clients, and all changes on remote stores, within `routing_ttl_s` (and `rollback` waits out
that TTL before it returns there). An unchanged registry costs one `pread` per call.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dlpipe.routing import (
    ABTestConfig,
    Heartbeat,
    RoutingCache,
    RoutingSignal,
    RoutingState,
    choose_version,
    signal_path_for,
)
from dlpipe.tracking.audit import audit_entries
from dlpipe.tracking.heartbeats import heartbeats_from_tags
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import METADATA_FILE
from dlpipe.tracking.store import NOT_FOUND, RegistryError, check_name, error_code, retry_locked
from dlpipe.tracking.tags import METADATA_TAG, ab_from_tags

CHAMPION = "champion"


class RegistryReader:
    """Read access to the MLflow Model Registry: versions, metadata and per-request routing."""

    def __init__(
        self,
        registry_uri: str | None = None,
        *,
        cache_dir: str | Path | None = None,
        routing_ttl_s: float = 2.0,
        use_routing_signal: bool = True,
    ) -> None:
        """Args:
        registry_uri: MLflow store; default MLFLOW_REGISTRY_URI, then the tracking URI.
        cache_dir: where downloaded versions are kept; default DLPIPE_MODEL_CACHE or
            ~/.cache/dlpipe/models.
        routing_ttl_s: longest time a cached routing state is trusted without a signal.
        use_routing_signal: watch the signal file beside a local store (False: TTL only, as
            for remote stores; e.g. a store on a network file system).
        """
        uri = registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or mlflow.get_tracking_uri()
        self.registry_uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        signal = RoutingSignal(signal_path_for(uri) if use_routing_signal else None)
        self.routing = RoutingCache(signal, routing_ttl_s)
        root = cache_dir or os.environ.get("DLPIPE_MODEL_CACHE") or "~/.cache/dlpipe/models"
        self.cache_dir = Path(root).expanduser() / hashlib.sha256(uri.encode()).hexdigest()[:12]
        self._rng = random.Random()

    # ---- reading ------------------------------------------------------------------------

    def get_model(self, name: str, version: str | int | None = None) -> str:
        """Local directory holding the version's package (None = latest; or an alias).

        Downloads once into the cache; `metadata.json` there carries the registry's metadata.
        """
        mv = self._resolve(name, version)
        dest = self.cache_dir / _slug(name) / f"{mv.version}-{mv.creation_timestamp}"
        if dest.is_dir():
            return str(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".download-{uuid.uuid4().hex}"
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=mv.source, dst_path=str(staging), tracking_uri=self.registry_uri
                )
            )
            if METADATA_TAG in mv.tags:
                meta = ModelMetadata.from_json(mv.tags[METADATA_TAG])
                meta.version = str(mv.version)
                (local / METADATA_FILE).write_text(meta.to_json())
            try:
                os.rename(local, dest)
            except OSError:
                if not dest.is_dir():  # not a concurrent download finishing first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(dest)

    def get_metadata(self, name: str, version: str | int | None = None) -> ModelMetadata:
        """The `ModelMetadata` stored with a version (number, alias, or None = latest)."""
        mv = self._resolve(name, version)
        if METADATA_TAG not in mv.tags:
            raise RegistryError(f"version {mv.version} of model {name!r} has no dlpipe metadata")
        meta = ModelMetadata.from_json(mv.tags[METADATA_TAG])
        meta.version = str(mv.version)
        return meta

    def list_versions(self, name: str) -> list[dict[str, Any]]:
        """Every version, oldest first: its metadata plus `aliases`, `run_id`, `source`."""
        # Search results carry no aliases: take them from the registered model.
        aliases = self._registered_model(name).aliases or {}
        out = []
        for mv in sorted(self._all_versions(name), key=lambda m: int(m.version)):
            row: dict[str, Any] = {}
            if METADATA_TAG in mv.tags:
                row.update(json.loads(mv.tags[METADATA_TAG]))
            row.update(
                version=str(mv.version),
                aliases=sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
                run_id=mv.run_id,
                source=mv.source,
                created_ms=mv.creation_timestamp,
            )
            out.append(row)
        return out

    def get_ab_config(self, name: str) -> ABTestConfig | None:
        """The A/B split stored in the registry now (always read from the store)."""
        return ab_from_tags(name, self._registered_model(name).tags)

    def history(self, name: str) -> list[dict[str, Any]]:
        """Audit trail (who, when, action, from, to), oldest first."""
        return audit_entries(self._registered_model(name).tags)

    def server_heartbeats(self, name: str) -> list[Heartbeat]:
        """Every server's last heartbeat (live or expired), read from the store now."""
        return heartbeats_from_tags(self._registered_model(name).tags)

    # ---- routing ------------------------------------------------------------------------

    def get_model_for_request(self, name: str, request_key: str | None = None) -> str:
        """Version that should answer this request (A/B split, else champion, else latest)."""
        return self.route_request(name, request_key)[0]

    def route_request(self, name: str, request_key: str | None = None) -> tuple[str, str]:
        """(version, route) for one request; route is `ab_a`, `ab_b` or `champion`."""
        try:
            return choose_version(self.routing_state(name), name, request_key, self._rng)
        except LookupError as err:
            raise RegistryError(str(err)) from err

    def routing_state(self, name: str) -> RoutingState:
        """Cached routing state; refetched when the routing signal moved or the TTL ran out."""
        check_name(name)
        return self.routing.get(name, lambda: self.fetch_routing(name))

    def fetch_routing(self, name: str) -> RoutingState:
        """The routing state read from the store now (no cache)."""
        model = self._registered_model(name)
        aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
        ab = ab_from_tags(name, model.tags)
        champion = aliases.get(CHAMPION)
        latest = None
        if ab is None and champion is None:
            latest = self._latest_version(name)
        return RoutingState(champion=champion, latest=latest, ab=ab, aliases=aliases)

    # ---- lookups ------------------------------------------------------------------------

    def _registered_model(self, name: str) -> Any:
        check_name(name)
        try:
            return retry_locked(lambda: self.client.get_registered_model(name))
        except MlflowException as err:
            if error_code(err) == NOT_FOUND:
                raise RegistryError(f"unknown model {name!r}") from err
            raise

    def _all_versions(self, name: str) -> list[ModelVersion]:
        found: list[ModelVersion] = []
        token: str | None = None
        while True:
            page = retry_locked(
                partial(self.client.search_model_versions, f"name='{name}'", page_token=token)
            )
            found.extend(page)
            token = page.token
            if not token:
                return found

    def _latest_version(self, name: str) -> str | None:
        page = retry_locked(
            lambda: self.client.search_model_versions(
                f"name='{name}'", max_results=1, order_by=["version_number DESC"]
            )
        )
        return str(page[0].version) if page else None

    def _version(self, name: str, number: str, what: str = "version") -> ModelVersion:
        try:
            return retry_locked(lambda: self.client.get_model_version(name, number))
        except MlflowException as err:
            if error_code(err) != NOT_FOUND:
                raise
            self._registered_model(name)  # unknown model gets its own message
            raise RegistryError(f"model {name!r} has no {what} {number}") from err

    def _resolve(self, name: str, version: str | int | None) -> ModelVersion:
        """A version given as None (latest), a number, `alias` or `@alias`."""
        check_name(name)
        if version is None:
            latest = self._latest_version(name)
            if latest is None:
                self._registered_model(name)
                raise RegistryError(f"model {name!r} has no versions")
            return self._version(name, latest)
        text = str(version).strip()
        if text.isdigit():
            return self._version(name, str(int(text)))
        alias = text.removeprefix("@")
        if not alias:
            raise RegistryError(f"empty version or alias for model {name!r}")
        try:
            return retry_locked(lambda: self.client.get_model_version_by_alias(name, alias))
        except MlflowException as err:
            self._registered_model(name)
            raise RegistryError(f"model {name!r} has no alias {alias!r}") from err


def _slug(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:60]
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
