"""SageMaker training entry point: `python -m dlpipe.sagemaker.entry` on every host of a job.

SageMaker runs the command once per host. This process reads the job from the environment
(`environment.py`), writes the resolved dlpipe config beside the job's output, and starts
torchrun for this host: `--nnodes` = the hosts, `--node-rank` = this host's index, one process
per GPU (per `training.num_processes` on CPU instances), rendezvous at the first host. Each
torchrun process is one rank of an ordinary launched dlpipe job (`dlpipe.training.launch`):
global rank 0 logs to MLflow, registers one version and writes the model package to
`SM_MODEL_DIR` (SageMaker uploads it as model.tar.gz), with `dlpipe-train.json` (run id,
version, test metrics) beside it.

Exit status: 0 trained, 1 training failed, 2 the job's settings are unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dlpipe.config import ConfigError, PipelineConfig, load_config, save_config
from dlpipe.sagemaker.environment import SageMakerEnvironment

RESULT_FILE = "dlpipe-train.json"
CONFIG_FILE = "dlpipe-config.yaml"


def job_config(sm: SageMakerEnvironment) -> PipelineConfig:
    """The dlpipe config for this job: the `config` hyperparameter, the SageMaker defaults
    (data from the `train` channel, checkpoints under the output data directory), the
    hyperparameter overrides, then what the hosts are (every GPU of every host)."""
    if not sm.config:
        raise ConfigError("hyperparameter 'config' (the dlpipe config file) is not set")
    path = Path(sm.config)
    if not path.is_absolute():
        path = sm.source_dir / path
    given = {item.split("=", 1)[0].strip() for item in sm.overrides}
    defaults = []
    if "train" in sm.channels and "data.path" not in given:
        defaults.append(f"data.path={sm.channels['train']}")
    if "training.checkpoint_dir" not in given:
        defaults.append(f"training.checkpoint_dir={sm.output_data_dir / 'checkpoints'}")
    hosts = [f"training.num_nodes={sm.num_nodes}", f"training.num_gpus={sm.num_gpus}"]
    cfg = load_config(path, [*defaults, *sm.overrides, *hosts])
    if cfg.training.strategy == "ray":
        raise ConfigError(
            "training.strategy=ray: a SageMaker job runs DDP, FSDP or DeepSpeed across its "
            "hosts; use one of those (or auto)"
        )
    return cfg


def torchrun_command(sm: SageMakerEnvironment, cfg: PipelineConfig, config_file: Path) -> list[str]:
    """This host's torchrun: its node rank, one process per GPU (CPU: num_processes)."""
    t = cfg.training
    per_host = t.num_gpus if t.num_gpus > 0 else t.num_processes
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={sm.num_nodes}",
        f"--node-rank={sm.node_rank}",
        f"--nproc-per-node={per_host}",
        f"--master-addr={sm.master_addr}",
        f"--master-port={sm.master_port}",
        "-m",
        "dlpipe.sagemaker.entry",
        "--rank",
        str(config_file),
    ]


def run_host(sm: SageMakerEnvironment) -> int:
    """Resolve the config and run this host's share of the job under torchrun."""
    cfg = job_config(sm)
    sm.output_data_dir.mkdir(parents=True, exist_ok=True)
    config_file = sm.output_data_dir / CONFIG_FILE
    save_config(cfg, config_file)
    env = dict(os.environ)
    if not env.get("MLFLOW_TRACKING_URI") and not cfg.tracking.tracking_uri:
        # No tracking server named: keep the run and the registry with the job's output
        # (output.tar.gz) rather than in a container directory that disappears.
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{sm.output_data_dir / 'mlflow.db'}"
        print(f"dlpipe: MLFLOW_TRACKING_URI not set; using {env['MLFLOW_TRACKING_URI']}")
    print(
        f"dlpipe: host {sm.current_host} is node {sm.node_rank} of {sm.num_nodes}, "
        f"rendezvous at {sm.master_addr}:{sm.master_port}",
        flush=True,
    )
    return subprocess.run(torchrun_command(sm, cfg, config_file), env=env, check=False).returncode


def run_rank(config_file: Path, sm: SageMakerEnvironment) -> int:
    """One torchrun process: train; global rank 0 also writes the model to SM_MODEL_DIR."""
    from dlpipe.training import train
    from dlpipe.training.devices import launched_rank

    result = train(load_config(config_file))
    if launched_rank() != 0:
        return 0
    sm.model_dir.mkdir(parents=True, exist_ok=True)
    if result.package_dir:
        shutil.copytree(result.package_dir, sm.model_dir, dirs_exist_ok=True)
    summary = {
        "run_id": result.run_id,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "metrics": result.metrics,
    }
    (sm.model_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlpipe.sagemaker.entry",
        description="dlpipe's SageMaker training entry point (run by SageMaker on each host).",
    )
    parser.add_argument("--rank", metavar="CONFIG", help=argparse.SUPPRESS)  # torchrun's side
    args = parser.parse_args(argv)
    try:
        sm = SageMakerEnvironment.from_environ()
        if args.rank:
            return run_rank(Path(args.rank), sm)
        return run_host(sm)
    except ConfigError as err:
        print(f"dlpipe sagemaker: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        print(f"dlpipe sagemaker: error: {type(err).__name__}: {err}", file=sys.stderr)
        if os.environ.get("DLPIPE_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
