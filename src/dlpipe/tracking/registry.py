"""`ModelRegistry`: versions with full metadata, aliases, A/B split and rollback on MLflow.

    reg = ModelRegistry("sqlite:///mlflow.db")
    v = reg.register_model("out/model", metadata)          # "1", "2", ...
    reg.promote("fashion", v)                                # alias `champion`
    reg.set_ab_config("fashion", ABTestConfig("1", "2", 0.9))
    reg.get_model_for_request("fashion", request_key="u1")   # cached: no DB query per call
    reg.rollback("fashion", to_version="1")                  # champion=1, A/B split ended

Every alias move and A/B change is appended to an audit trail (registered-model tags
`dlpipe.audit.*`, see `history`), since MLflow keeps no alias history. Reading and the routing
cache (and its staleness bound) live in `registry_reader`.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from dlpipe.routing import ABTestConfig, ab_config_to_dict
from dlpipe.tracking.audit import audit_entry
from dlpipe.tracking.context import MLFLOW_PARENT_RUN_ID, context_tags
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.mlflow_model import MLMODEL_FILE, is_loadable_package, write_mlflow_model
from dlpipe.tracking.package import MODEL_FILES
from dlpipe.tracking.registry_reader import CHAMPION, RegistryReader
from dlpipe.tracking.store import (
    ALREADY_EXISTS,
    NOT_FOUND,
    RegistryError,
    check_name,
    error_code,
    retry_locked,
)
from dlpipe.tracking.tags import AB_TAG, METADATA_TAG, ab_from_tags, coerce_metadata, metadata_tags

__all__ = ["ABTestConfig", "ModelRegistry", "RegistryError"]


class ModelRegistry(RegistryReader):
    """The MLflow Model Registry with dlpipe metadata, A/B routing, rollback and audit trail."""

    def register_model(
        self,
        model_path: str | Path,
        metadata: ModelMetadata | dict[str, Any],
        run_id: str | None = None,
        artifact_path: str | None = None,
    ) -> str:
        """Upload a model package directory and create a new version carrying `metadata`.

        The package goes to `run_id`'s artifacts (under `artifact_path`, default a fresh
        `model-<id>` so no earlier version's files are overwritten), or to a new run in an
        experiment named after the model. A package without `MLmodel` gets the MLflow model
        files uploaded beside it (the directory itself is left as it is), so every version
        loads with `mlflow.pyfunc.load_model`. Fills `metadata.version` (or
        `metadata["version"]`); returns the version. Nothing is written when the metadata,
        package or parent_version is invalid.
        """
        meta = coerce_metadata(metadata)
        package = Path(model_path)
        if not package.is_dir():
            raise RegistryError(f"model package {package} is not a directory")
        if not any((package / f).is_file() for f in MODEL_FILES):
            raise RegistryError(f"model package {package} has none of {MODEL_FILES}")
        name = check_name(meta.model_name)
        if meta.parent_version not in (None, ""):
            self._version(name, str(meta.parent_version), what="parent_version")
        if run_id is not None:
            given = run_id
            try:
                run = retry_locked(lambda: self.client.get_run(given))
            except MlflowException as err:
                raise RegistryError(f"unknown run_id {run_id!r}") from err
            path = artifact_path or f"model-{uuid.uuid4().hex[:8]}"
        else:
            run = self._new_run(name)
            path = artifact_path or "model"
        run_uuid: str = run.info.run_id
        retry_locked(lambda: self.client.log_artifacts(run_uuid, str(package), path))
        self._add_mlflow_model(package, run_uuid, path)
        if run_id is None:  # our own upload run is complete
            retry_locked(lambda: self.client.set_terminated(run_uuid))
        source = f"{run.info.artifact_uri.rstrip('/')}/{path}"
        if not meta.source_run_id:
            meta.source_run_id = run_uuid
        mv = self._create_version(name, source, run_uuid, metadata_tags(meta))
        meta.version = str(mv.version)
        if isinstance(metadata, dict):
            metadata["version"] = meta.version
        # The full-JSON tag now gets the assigned version too.
        retry_locked(
            partial(
                self.client.set_model_version_tag, name, meta.version, METADATA_TAG, meta.to_json()
            )
        )
        self.routing.publish(name)  # with no champion, "latest" answers requests: a change
        return meta.version

    def promote(self, name: str, version: str | int, alias: str = CHAMPION) -> str:
        """Point `alias` (default `champion`) at a version; returns the version number."""
        if not alias or alias.isdigit() or alias == "latest":
            raise RegistryError(f"invalid alias {alias!r}")
        target = str(self._resolve(name, version).version)
        previous = self.fetch_routing(name).aliases.get(alias)
        retry_locked(lambda: self.client.set_registered_model_alias(name, alias, target))
        self._record(name, "promote", previous, target, alias=alias)
        return target

    def set_ab_config(self, name: str, config: ABTestConfig) -> None:
        """Store an A/B split in the registry; both versions must exist."""
        if not isinstance(config, ABTestConfig):
            raise RegistryError(f"expected ABTestConfig, got {type(config).__name__}")
        for version in (config.model_a_version, config.model_b_version):
            self._version(name, version)
        previous = self.get_ab_config(name)
        retry_locked(lambda: self.client.set_registered_model_tag(name, AB_TAG, config.to_json()))
        self._record(name, "ab_set", ab_config_to_dict(previous), ab_config_to_dict(config))

    def clear_ab_config(self, name: str) -> bool:
        """End the A/B split; False when there was none (nothing recorded then)."""
        previous = self.get_ab_config(name)
        if previous is None:
            return False
        retry_locked(lambda: self.client.delete_registered_model_tag(name, AB_TAG))
        self._record(name, "ab_clear", ab_config_to_dict(previous), None)
        return True

    def rollback(self, name: str, to_version: str | int) -> dict[str, Any]:
        """Send all traffic to `to_version`: champion moves there and any A/B split ends.

        Once this returns, no `get_model_for_request` call that starts afterwards, in any
        process, returns a version rolled back from. Returns what changed.
        """
        target = str(self._resolve(name, to_version).version)
        model = self._registered_model(name)
        before = self.fetch_routing(name)
        ab = ab_from_tags(name, model.tags)
        retry_locked(lambda: self.client.set_registered_model_alias(name, CHAMPION, target))
        if ab is not None:
            retry_locked(lambda: self.client.delete_registered_model_tag(name, AB_TAG))
        rolled_back_from = [v for v in before.serving_versions() if v != target]
        signalled = self._record(
            name,
            "rollback",
            before.champion,
            target,
            rolled_back_from=rolled_back_from,
            ab_cleared=ab_config_to_dict(ab),
        )
        if not signalled:
            # No shared signal (remote store): every process's cache expires within the TTL.
            time.sleep(self.routing.ttl_s)
        return {
            "model": name,
            "from": before.champion,
            "to": target,
            "rolled_back_from": rolled_back_from,
            "ab_cleared": ab_config_to_dict(ab),
        }

    def start_run(
        self,
        name: str,
        run_name: str,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str:
        """Start a run for work on model `name` (e.g. an optimization variant); its id.

        Nested under `parent_run_id` (MLflow's `mlflow.parentRunId` tag, same experiment) when
        that run exists, else in the experiment named after the model. End it with
        `client.set_terminated`.
        """
        check_name(name)
        return str(self._new_run(name, run_name, parent_run_id, tags).info.run_id)

    def audit(self, name: str, action: str, from_value: Any, to_value: Any, **detail: Any) -> None:
        """Append an entry to the audit trail that changes no routing (e.g. a canary's analysis,
        with its statistics in `detail`)."""
        key, value, _ = audit_entry(action, from_value, to_value, **detail)
        retry_locked(lambda: self.client.set_registered_model_tag(name, key, value))

    # ---- internals -----------------------------------------------------------------------

    def _record(
        self, name: str, action: str, from_value: Any, to_value: Any, **detail: Any
    ) -> bool:
        """Append an audit entry, then publish the routing change; False without a signal."""
        self.audit(name, action, from_value, to_value, **detail)
        return self.routing.publish(name)

    def _add_mlflow_model(self, package: Path, run_id: str, path: str) -> None:
        """Upload MLmodel & co. for a package that has none (built by hand or by older code)."""
        if (package / MLMODEL_FILE).is_file() or not is_loadable_package(package):
            return
        with tempfile.TemporaryDirectory(prefix="dlpipe-mlmodel-") as tmp:
            write_mlflow_model(package, tmp)
            retry_locked(lambda: self.client.log_artifacts(run_id, tmp, path))

    def _new_run(
        self,
        name: str,
        run_name: str = "registry",
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Run:
        """A run with MLflow's context tags: a child of `parent_run_id` in its experiment when
        that run exists, else in the experiment named after the model (created if missing)."""
        run_tags = dict(tags or {})
        experiment_id = None
        if parent_run_id:
            try:
                parent = retry_locked(lambda: self.client.get_run(parent_run_id))
            except MlflowException as err:  # deleted or from another store: not nested then
                if error_code(err) != NOT_FOUND:
                    raise
            else:
                experiment_id = parent.info.experiment_id
                run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        if experiment_id is None:
            experiment_id = self._experiment_for(name)
        resolved = context_tags(run_tags)
        return retry_locked(
            lambda: self.client.create_run(experiment_id, run_name=run_name, tags=resolved)
        )

    def _experiment_for(self, name: str) -> str:
        experiment = retry_locked(lambda: self.client.get_experiment_by_name(name))
        if experiment is None:
            try:
                return str(retry_locked(lambda: self.client.create_experiment(name)))
            except MlflowException as err:  # another process created it first
                if error_code(err) != ALREADY_EXISTS:
                    raise
                found = retry_locked(lambda: self.client.get_experiment_by_name(name))
                if found is None:
                    raise
                return str(found.experiment_id)
        if experiment.lifecycle_stage != "active":
            raise RegistryError(f"experiment {name!r} is deleted; restore it or pass run_id")
        return str(experiment.experiment_id)

    def _create_version(
        self, name: str, source: str, run_id: str, tags: dict[str, str]
    ) -> ModelVersion:
        """Create a version, creating the registered model first when it does not exist.

        The store allocates the number inside one transaction (max + 1 under a unique key on
        (name, version), retried on conflict); sqlite lock errors are retried here.
        """

        def create() -> ModelVersion:
            return self.client.create_model_version(name, source, run_id, tags=tags)

        try:
            return retry_locked(create)
        except MlflowException as err:
            if error_code(err) != NOT_FOUND:
                raise
        try:
            retry_locked(lambda: self.client.create_registered_model(name))
        except MlflowException as err:  # another process created it first
            if error_code(err) != ALREADY_EXISTS:
                raise
        return retry_locked(create)
