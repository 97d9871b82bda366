"""`dlpipe models`: list the registered architectures."""

from __future__ import annotations

import argparse
import json

from dlpipe.models.architectures import get_architecture, list_models


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dlpipe models", description="List model architectures.")
    parser.add_argument("--task", choices=["image_classification", "text_classification"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    names = list_models(args.task)
    if args.json:
        print(json.dumps({n: get_architecture(n).task for n in names}))
    else:
        for n in names:
            print(f"{n:22s} {get_architecture(n).task}")
    return 0
