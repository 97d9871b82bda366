"""`dlpipe` command line: a table from subcommand to `module:main(argv) -> int`.

dlpipe train -c configs/fashion_mnist.yaml -o training.num_epochs=3
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("dlpipe.pipeline", "train, register, optimize, serve and evaluate end to end"),
    "train": ("dlpipe.training.cli", "train a model (one process, DDP or Ray) and register it"),
    "registry": ("dlpipe.tracking.cli", "list, show, promote, A/B split and roll back versions"),
    "optimize": ("dlpipe.optimize.cli", "ONNX export, INT8/FP16 quantization, pruning, TensorRT"),
    "serve": ("dlpipe.serving.cli", "serve registered models over HTTP (FastAPI + ONNX Runtime)"),
    "models": ("dlpipe.models.cli", "list the model architectures"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:10s} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: dlpipe COMMAND [ARGS]\n\ncommands:\n{rows}\n\n`dlpipe COMMAND -h` for help."


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
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code: int = module.main(rest)
    return code


if __name__ == "__main__":
    sys.exit(main())
