"""MLflow's standard context tags for every run dlpipe creates (user, source, git commit).

`MlflowClient.create_run` adds none of them (only the fluent `mlflow.start_run` does), which is
why runs used to show user "unknown" and no source. `context_tags()` asks MLflow's own context
providers, then fills the git tags MLflow could not find: its provider only looks at the main
script (`sys.argv[0]`), which is nowhere near a checkout for `python -c`, a notebook or a
`dlpipe` console script installed outside the project.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_REPO_URL,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

__all__ = [
    "MLFLOW_GIT_COMMIT",
    "MLFLOW_PARENT_RUN_ID",
    "MLFLOW_SOURCE_NAME",
    "MLFLOW_SOURCE_TYPE",
    "MLFLOW_USER",
    "context_tags",
    "git_tags",
]


def git_tags(path: str | Path) -> dict[str, str]:
    """`mlflow.source.git.*` tags of the checkout holding `path` ({} outside a checkout)."""
    from mlflow.utils.git_utils import get_git_branch, get_git_commit, get_git_repo_url

    where = str(path)
    found = {
        MLFLOW_GIT_COMMIT: get_git_commit(where),
        MLFLOW_GIT_BRANCH: get_git_branch(where),
        MLFLOW_GIT_REPO_URL: get_git_repo_url(where),
    }
    if not found[MLFLOW_GIT_COMMIT]:
        return {}
    return {k: v for k, v in found.items() if v}


def _user() -> str:
    # getpass fails for a uid without a passwd entry (common in containers): say which uid.
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def context_tags(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Tags for a new run: MLflow's context (user, source name and type, git), then `extra`.

    Git tags come from the main script's checkout when MLflow finds one, else from the
    working directory's, else from the checkout dlpipe itself runs from (an editable install).
    """
    from mlflow.tracking.context.registry import resolve_tags

    tags: dict[str, str] = {k: str(v) for k, v in resolve_tags().items()}
    if tags.get(MLFLOW_USER, "unknown") == "unknown":
        tags[MLFLOW_USER] = _user()
    if MLFLOW_GIT_COMMIT not in tags:
        import dlpipe

        for place in (Path.cwd(), Path(dlpipe.__file__).resolve().parent):
            found = git_tags(place)
            if found:
                tags.update(found)
                break
    tags.update(extra or {})
    return tags
