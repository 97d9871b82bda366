"""What a SageMaker training container tells the job, read from its environment variables.

The contract is the one both the SageMaker training toolkit and the SDK's own container drivers
(`sagemaker` 3.x `ModelTrainer`) set on every host of a training job:

- `SM_HOSTS`: JSON list of the job's hosts (`["algo-1", "algo-2"]`): `training.num_nodes`;
  sorted, the first one is the rendezvous host;
- `SM_CURRENT_HOST`: this host's name: its node rank is its index in the sorted hosts;
- `SM_NUM_GPUS`: GPUs on this host: `training.num_gpus` (every GPU is used);
- `SM_MODEL_DIR`: what SageMaker uploads as model.tar.gz: rank 0 writes the model package there;
- `SM_CHANNEL_<NAME>`: where input channel NAME was downloaded; `SM_CHANNEL_TRAIN` becomes
  `data.path`;
- `SM_OUTPUT_DATA_DIR`: uploaded as output.tar.gz: checkpoints, unless an override moves them;
- `SM_HP_CONFIG`: hyperparameter `config`, the dlpipe config file (relative to the code);
- `SM_HP_OVERRIDES`: hyperparameter `overrides`, a JSON list of `section.key=value` (as `-o`);
- `SM_HP_<SECTION>__<KEY>`: hyperparameter `section__key`, one more override `section.key=...`
  (SageMaker exports hyperparameters as shell variables: a dot is not allowed in their names);
- `SM_MASTER_ADDR`, `SM_MASTER_PORT` (the SDK's drivers): the rendezvous address and port.

Overrides for running outside SageMaker (all hosts on one machine, or host names that do not
resolve): `MASTER_ADDR` and `MASTER_PORT` win over everything above.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dlpipe.config import ConfigError

DEFAULT_PORT = 29500
# Hyperparameters the SageMaker SDKs add for themselves (entry point, code location, region).
SDK_HYPERPARAMETER_PREFIX = "SAGEMAKER_"
SPECIAL = {"CONFIG", "OVERRIDES"}


def _decode(raw: str) -> object:
    """A hyperparameter value: the SDKs JSON-encode everything that is not a plain string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


@dataclass(frozen=True)
class SageMakerEnvironment:
    """One host's view of a SageMaker training job."""

    hosts: list[str]
    current_host: str
    num_gpus: int
    model_dir: Path
    output_data_dir: Path
    source_dir: Path
    channels: dict[str, Path] = field(default_factory=dict)
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    master_addr: str = ""
    master_port: int = DEFAULT_PORT

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SageMakerEnvironment:
        """Read the contract above; ConfigError names a missing or malformed variable."""
        env = os.environ if environ is None else environ
        try:
            hosts = sorted(json.loads(env["SM_HOSTS"]))
            current = env["SM_CURRENT_HOST"]
            model_dir = Path(env["SM_MODEL_DIR"])
        except KeyError as err:
            raise ConfigError(f"{err.args[0]} is not set: not a SageMaker training host") from None
        except json.JSONDecodeError:
            raise ConfigError(f"SM_HOSTS is not a JSON list: {env['SM_HOSTS']!r}") from None
        if current not in hosts:
            raise ConfigError(f"SM_CURRENT_HOST={current!r} is not one of SM_HOSTS={hosts}")
        channels = {
            name.removeprefix("SM_CHANNEL_").lower(): Path(value)
            for name, value in env.items()
            if name.startswith("SM_CHANNEL_") and name != "SM_CHANNELS"
        }
        config, overrides = _hyperparameters(env)
        port = env.get("MASTER_PORT") or env.get("SM_MASTER_PORT") or str(DEFAULT_PORT)
        return cls(
            hosts=hosts,
            current_host=current,
            num_gpus=int(env.get("SM_NUM_GPUS", "0")),
            model_dir=model_dir,
            output_data_dir=Path(env.get("SM_OUTPUT_DATA_DIR", str(model_dir.parent / "output"))),
            source_dir=Path(env.get("SM_SOURCE_DIR") or env.get("SM_MODULE_DIR") or os.getcwd()),
            channels=channels,
            config=config,
            overrides=overrides,
            master_addr=env.get("MASTER_ADDR") or env.get("SM_MASTER_ADDR") or hosts[0],
            master_port=int(port),
        )


def _hyperparameters(env: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """(config file, overrides) from the `SM_HP_*` variables."""
    config: str | None = None
    overrides: list[str] = []
    if "SM_HP_CONFIG" in env:
        config = str(_decode(env["SM_HP_CONFIG"]))
    if "SM_HP_OVERRIDES" in env:
        value = _decode(env["SM_HP_OVERRIDES"])
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(
                "hyperparameter overrides must be a list of section.key=value strings, got "
                f"{env['SM_HP_OVERRIDES']!r}"
            )
        overrides.extend(value)
    for name in sorted(env):
        if not name.startswith("SM_HP_"):
            continue
        key = name.removeprefix("SM_HP_")
        if key in SPECIAL or key.startswith(SDK_HYPERPARAMETER_PREFIX):
            continue
        if "__" not in key:
            raise ConfigError(
                f"hyperparameter {key.lower()!r} is not a dlpipe setting: name them "
                "section__key (training__num_epochs), or pass overrides=[...]"
            )
        overrides.append(f"{key.lower().replace('__', '.')}={env[name]}")
    return config, overrides
