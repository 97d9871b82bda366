"""Profiling a training run (`training.profiler: simple | advanced | pytorch`).

    profiler = build_profiler("simple", run_dir / "profiler")   # for pl.Trainer(profiler=...)
    log_profiler_reports(tracker, run_dir / "profiler")          # after the fit: MLflow `profiler/`

Lightning's profilers write one report per process (`fit-profile-<rank>.txt`) when the fit ends:
`simple` times each hook and step (where the time goes: data loading, forward/backward,
optimizer, checkpointing), `advanced` adds cProfile's per-function statistics, `pytorch` the
operator-level table of `torch.profiler` plus a Chrome trace of a few steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning.pytorch.profilers import (
    AdvancedProfiler,
    Profiler,
    PyTorchProfiler,
    SimpleProfiler,
)

from dlpipe.tracking.experiment import ExperimentTracker

ProfilerKind = Literal["simple", "advanced", "pytorch"]
REPORT_NAME = "profile"
ARTIFACT_DIR = "profiler"


def build_profiler(kind: ProfilerKind | None, dirpath: Path) -> Profiler | None:
    """The Lightning profiler for `kind`, writing its reports under `dirpath` (None: off)."""
    if kind is None:
        return None
    if kind == "simple":
        return SimpleProfiler(dirpath=dirpath, filename=REPORT_NAME, extended=True)
    if kind == "advanced":
        return AdvancedProfiler(dirpath=dirpath, filename=REPORT_NAME)
    # Chrome traces of every step would be huge: torch.profiler's default schedule records a
    # few steps after a warm-up, which is what a bottleneck hunt needs.
    return PyTorchProfiler(dirpath=dirpath, filename=REPORT_NAME, export_to_chrome=True)


def log_profiler_reports(tracker: ExperimentTracker, dirpath: Path) -> list[Path]:
    """Log every report the profilers wrote under `dirpath` to the run's `profiler/` artifacts;
    returns the files logged (none when profiling was off)."""
    if not dirpath.is_dir():
        return []
    reports = sorted(p for p in dirpath.rglob("*") if p.is_file() and p.stat().st_size > 0)
    for report in reports:
        relative = report.parent.relative_to(dirpath)
        destination = ARTIFACT_DIR if relative == Path(".") else f"{ARTIFACT_DIR}/{relative}"
        tracker.log_artifact(str(report), destination)
    return reports
