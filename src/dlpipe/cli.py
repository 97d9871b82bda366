"""`dlpipe` command line: a table from subcommand to `module:main(argv) -> int`.

    dlpipe train -c configs/fashion_mnist.yaml -o training.num_epochs=3

Every command keeps one contract (`dlpipe.cli_support`): exit status 0 success, 1 the job
failed, 2 usage or configuration error; with `--json` stdout holds only the JSON.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple

from dlpipe.cli_support import EXIT_STATUS_HELP, EXIT_USAGE, missing_extra_line


class Command(NamedTuple):
    module: str
    extra: str | None
    """The pyproject extra the command needs beyond the core install."""
    help: str


COMMANDS: dict[str, Command] = {
    "run": Command(
        "dlpipe.pipeline", "all", "train, register, optimize, serve and evaluate end to end"
    ),
    "train": Command(
        "dlpipe.training.cli", "train", "train a model (one process, DDP or Ray) and register it"
    ),
    "registry": Command(
        "dlpipe.tracking.cli", "serve", "list, show, promote, A/B split and roll back versions"
    ),
    "import": Command(
        "dlpipe.importer",
        "train",
        "register a model trained elsewhere (.keras, SavedModel, .onnx, TorchScript)",
    ),
    "optimize": Command(
        "dlpipe.optimize.cli", "train", "ONNX export, INT8/FP16 quantization, pruning, TensorRT"
    ),
    "serve": Command(
        "dlpipe.serving.cli", "serve", "serve registered models over HTTP (FastAPI + ONNX Runtime)"
    ),
    "sagemaker": Command(
        "dlpipe.sagemaker.cli", "sagemaker", "run a training config as a SageMaker training job"
    ),
    "models": Command("dlpipe.models.cli", None, "list the model architectures"),
    "config": Command("dlpipe.config_cli", None, "list config keys and their docs; read one"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:10s} {command.help}" for name, command in COMMANDS.items())
    return (
        f"usage: dlpipe COMMAND [ARGS]\n\ncommands:\n{rows}\n\n`dlpipe COMMAND -h` for help; "
        f"--json on any command writes only JSON to stdout.\n{EXIT_STATUS_HELP}"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from dlpipe import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"dlpipe: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr
        )
        return EXIT_USAGE
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
        code: int = module.main(rest)
    except ModuleNotFoundError as err:
        # A lean install (`pip install 'dlpipe[serve]'`) lacks other commands' stacks.
        if (err.name or "dlpipe").startswith("dlpipe"):
            raise
        print(missing_extra_line(f"dlpipe {name}", err, command.extra), file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
