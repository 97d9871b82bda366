"""`dlpipe registry canary`: the command around `dlpipe.quality.canary_runner.CanaryRunner`.

    dlpipe registry canary fashion --candidate 4 --prediction-log /var/lib/dlpipe/predictions \
        --steps 5,25,50,100 --min-samples 330 --wait --json

Exit 0 when the candidate was promoted, 1 when it was rolled back (its report still printed),
2 for a bad command line. Each decision is one line on stderr as it happens.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from dlpipe.cli_support import UsageError, add_field_flag
from dlpipe.quality.canary import CanaryPolicy, Decision


class CanaryRolledBack(Exception):
    """The canary ended in a rollback: the job ran and the candidate failed (exit 1)."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def add_canary_parser(
    sub: Any, parents: list[argparse.ArgumentParser], seconds: Callable[[str], float]
) -> None:
    """`dlpipe registry canary NAME --candidate V ...`: the policy's fields are its flags."""
    p = sub.add_parser(
        "canary", parents=parents,
        help="move traffic to a candidate in steps; promote it, or roll it back when live "
        "traffic shows it worse (exit 1 then)",
    )  # fmt: skip
    p.add_argument("name")
    p.add_argument("--candidate", required=True, help="the version to try")
    for field in CanaryPolicy.model_fields:
        add_field_flag(p, CanaryPolicy, field, default_text=_default(field))
    p.add_argument(
        "--prediction-log", metavar="DIR", default=os.environ.get("DLPIPE_PREDICTION_LOG_DIR"),
        help="the servers' prediction log directory (default DLPIPE_PREDICTION_LOG_DIR)",
    )  # fmt: skip
    p.add_argument(
        "--poll", type=seconds, default=1.0, metavar="S", help="read the log every S seconds"
    )
    p.add_argument(
        "--metrics-port", type=int, metavar="PORT",
        help="serve the dlpipe_canary_* metrics on 127.0.0.1:PORT/metrics while running",
    )  # fmt: skip


def _default(field: str) -> str:
    value = CanaryPolicy.model_fields[field].get_default(call_default_factory=True)
    shown = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
    return f"default {shown}"


def run_canary(reg: Any, args: argparse.Namespace) -> tuple[Any, Callable[[Console], None]]:
    """Run the canary to its end; raises `CanaryRolledBack` (exit 1) unless promoted."""
    from dlpipe.quality.canary_runner import CanaryMetrics, CanaryRunner
    from dlpipe.tracking.heartbeats import wait_until_applied

    if not args.prediction_log:
        raise UsageError("canary needs --prediction-log DIR (or DLPIPE_PREDICTION_LOG_DIR)")
    given = {f: getattr(args, f) for f in CanaryPolicy.model_fields if getattr(args, f) is not None}
    try:
        policy = CanaryPolicy(**given)
    except ValidationError as err:  # the steps together; each flag checked its own value
        raise UsageError(err.errors()[0]["msg"].removeprefix("Value error, ")) from err
    metrics = CanaryMetrics()
    if args.metrics_port is not None:
        metrics.serve(args.metrics_port)

    def wait() -> None:
        wait_until_applied(reg, args.name, args.wait_timeout)

    def show(decision: Decision) -> None:
        checks = ", ".join(
            f"{name} p={c['p_value']:.3g}"
            for name, c in decision.checks.items()
            if c["p_value"] is not None
        )
        print(
            f"canary {decision.action} at {decision.share} % -> {decision.next_share} %: "
            f"{'; '.join(decision.reasons)} ({checks or 'no test'})",
            file=sys.stderr,
            flush=True,
        )

    runner = CanaryRunner(
        reg, args.name, args.candidate, policy, args.prediction_log,
        wait=wait if args.wait else None, poll_s=args.poll, metrics=metrics, on_decision=show,
    )  # fmt: skip
    result = runner.run().to_dict()
    args.wait = False  # each step waited already
    if result["outcome"] != "promote":
        reasons = result["decisions"][-1]["reasons"] if result["decisions"] else []
        raise CanaryRolledBack(
            f"version {args.candidate} rolled back: {'; '.join(reasons)}", result
        )
    return result, lambda console: console.print(
        f"{args.name}: version {args.candidate} promoted after "
        f"{len(result['decisions'])} look(s) in {result['duration_s']:.0f} s"
    )
