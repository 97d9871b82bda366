"""`ExperimentTracker`: MLflow runs for training (design section 3).

    tracker = ExperimentTracker()              # MLFLOW_TRACKING_URI, else MLflow's default
    run_id = tracker.start_run("fashion_mnist", cfg.flat_params())
    tracker.log_metrics({"val/acc": 0.91}, step=0)
    tracker.end_run()

The tracker talks to MLflow through an explicit run id (never MLflow's global "active run"), so a
pickled copy in a DDP or Ray worker keeps logging into the same run. Only global rank 0 writes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dlpipe.tracking.context import context_tags

# MLflow limits a param value to 6000 characters and a batch to 100 params.
_MAX_PARAM_LENGTH = 6000
_PARAM_BATCH = 100


def global_rank() -> int:
    """This process's rank in a distributed job (0 when not distributed)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", None)
    if rank is not None:
        return int(rank)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class TrackingError(RuntimeError):
    """The tracker was used out of order (e.g. logging before `start_run`)."""


class ExperimentTracker:
    """Log one training run to MLflow: params, per-epoch metrics, artifacts, registration.

    Args:
        tracking_uri: MLflow tracking URI; None uses MLFLOW_TRACKING_URI, else MLflow's default.
        experiment_name: experiment the runs go to (created when missing).
    """

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "dlpipe") -> None:
        # Resolve now, so worker processes with another working directory use the same store.
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri
        self.experiment_name = experiment_name
        self.run_id: str | None = None
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None  # rebuilt lazily in the receiving process
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri, self.registry_uri)
        return self._client

    @property
    def is_logging_rank(self) -> bool:
        return global_rank() == 0

    def _require_run(self) -> str:
        if self.run_id is None:
            raise TrackingError("no active run: call start_run() first")
        return self.run_id

    def start_run(
        self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None
    ) -> str:
        """Start a run in the experiment, log `params`, and return the run id.

        The run carries MLflow's context tags (user, source, git commit; see
        `dlpipe.tracking.context`) plus `tags`.
        """
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(self.experiment_name)
        )
        run = self.client.create_run(experiment_id, run_name=run_name, tags=context_tags(tags))
        self.run_id = run.info.run_id
        self.log_params(params)
        return self.run_id

    def attach(self, run_id: str) -> None:
        """Continue logging into an existing run (e.g. when resuming training)."""
        self.client.get_run(run_id)  # raises if the run does not exist
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (values as strings, cut to MLflow's length limit)."""
        run_id = self._require_run()
        if not self.is_logging_rank or not params:
            return
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log metric values at `step` (non-finite values are refused by name)."""
        run_id = self._require_run()
        if not self.is_logging_rank or not metrics:
            return
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        batch = []
        for key, value in metrics.items():
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"metric {key!r} is not a finite number: {value!r}")
            batch.append(Metric(key, number, now, int(step)))
        self.client.log_batch(run_id, metrics=batch)

    def log_artifact(self, artifact_path: str, destination: str | None = None) -> None:
        """Upload a file or directory to the run's artifacts (under `destination`)."""
        run_id = self._require_run()
        if not self.is_logging_rank:
            return
        path = Path(artifact_path)
        if not path.exists():
            raise FileNotFoundError(f"artifact not found: {path}")
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), destination or path.name)
        else:
            self.client.log_artifact(run_id, str(path), destination)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the run."""
        run_id = self._require_run()
        if self.is_logging_rank:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)

    def register_model(self, model_path: str, model_name: str) -> str:
        """Upload `model_path` as a run artifact and register it as a new version.

        The first call in a run uploads to `model`, later ones to `model-2`, `model-3`, ...:
        a version's source must never be overwritten by the next one.

        Returns:
            The new version number as a string.
        """
        run_id = self._require_run()
        if not self.is_logging_rank:
            raise TrackingError("register_model is only allowed on global rank 0")
        artifact_path = self._free_model_artifact_path(run_id)
        self.log_artifact(model_path, artifact_path)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        try:
            self.client.get_registered_model(model_name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(model_name)
        version = self.client.create_model_version(model_name, source=source, run_id=run_id)
        return str(version.version)

    def _free_model_artifact_path(self, run_id: str) -> str:
        # Asks the store rather than counting calls, so a re-attached tracker continues too.
        taken = {a.path for a in self.client.list_artifacts(run_id)}
        if "model" not in taken:
            return "model"
        n = 2
        while f"model-{n}" in taken:
            n += 1
        return f"model-{n}"

    def end_run(self, status: str = "FINISHED") -> None:
        """Close the run (`FINISHED`, `FAILED` or `KILLED`)."""
        if self.run_id is None:
            return
        if self.is_logging_rank:
            self.client.set_terminated(self.run_id, status=status)
        self.run_id = None
