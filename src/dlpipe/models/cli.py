"""`dlpipe models`: list the architectures in the catalogue.

    dlpipe models --task text_classification --json      # {"minilm": "text_classification"}

The catalogue is `dlpipe.models.architectures`; listing it imports no framework.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from dlpipe.cli_support import CommandParser, Outcome, add_json_flag, run_command
from dlpipe.models.architectures import TASKS, get_architecture, list_models


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dlpipe models", description="List model architectures.")
    parser.add_argument("--task", choices=TASKS)
    add_json_flag(parser, "{name: task}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe models`; returns the exit status."""
    return run_command(build_parser(), _job, argv)


def _job(args: argparse.Namespace) -> Outcome:
    tasks = {name: get_architecture(name).task for name in list_models(args.task)}

    def render(console: Console) -> None:
        for name, task in tasks.items():
            console.out(f"{name:22s} {task}", highlight=False)

    return Outcome(tasks, render)


if __name__ == "__main__":
    sys.exit(main())
