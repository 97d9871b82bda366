"""A model package is also an MLflow model: `MLmodel` and its files beside the package files.

    <dir>/MLmodel                    python_function flavor (loader `dlpipe.serving.pyfunc`,
                                     data "."), plus the `onnx` flavor (data model.onnx) when the
                                     package has an ONNX graph; signature; dlpipe metadata
    <dir>/requirements.txt  python_env.yaml  conda.yaml
    <dir>/input_example.json  serving_input_example.json

So `mlflow.pyfunc.load_model("models:/NAME@champion")`, `mlflow models serve` and MLflow-aware
servers (MLServer, KServe's MLflow runtime) load a registered version, while `dlpipe serve`
keeps reading the same directory as before. The pyfunc input and output columns are described
in `dlpipe.serving.pyfunc`. No PyTorch flavor: `weights.pt` is a state_dict, which
`mlflow.pytorch` cannot load; the pyfunc rebuilds the network from config.yaml instead.
"""

from __future__ import annotations

import importlib.metadata
import io
from pathlib import Path
from typing import Any

from dlpipe.config import PreprocessingConfig
from dlpipe.tracking.metadata import ModelMetadata

MLMODEL_FILE = "MLmodel"
LOADER_MODULE = "dlpipe.serving.pyfunc"
IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"
OUTPUT_COLUMNS = ("label", "class_index", "probability", "probabilities")
EXAMPLE_TEXT = "A gripping, beautifully shot film."
# Package files (names as in dlpipe.tracking.package, which imports this module).
_ONNX_FILE = "model.onnx"
_WEIGHTS_FILE = "weights.pt"
_PREPROCESSING_FILE = "preprocessing.json"
_METADATA_FILE = "metadata.json"
_CONFIG_FILE = "config.yaml"


def is_loadable_package(directory: str | Path) -> bool:
    """Whether the pyfunc can run this package (an ONNX graph, or weights plus config.yaml)."""
    d = Path(directory)
    if not (d / _PREPROCESSING_FILE).is_file() and not (d / _METADATA_FILE).is_file():
        return False
    return (d / _ONNX_FILE).is_file() or (
        (d / _WEIGHTS_FILE).is_file() and (d / _CONFIG_FILE).is_file()
    )


def package_preprocessing(directory: str | Path) -> PreprocessingConfig:
    """The preprocessing a package serves with: preprocessing.json, else its metadata's (the
    order `dlpipe serve` reads them in, so both answer with the same labels)."""
    d = Path(directory)
    if (d / _PREPROCESSING_FILE).is_file():
        return PreprocessingConfig.model_validate_json((d / _PREPROCESSING_FILE).read_text())
    if (d / _METADATA_FILE).is_file():
        return ModelMetadata.from_json((d / _METADATA_FILE).read_text()).preprocessing_config
    raise FileNotFoundError(f"{d}: no {_PREPROCESSING_FILE} and no {_METADATA_FILE}")


def model_signature(pre: PreprocessingConfig) -> Any:
    """Input: one column (`image` binary, or `text` string); output: `OUTPUT_COLUMNS`."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    if pre.task_type == "text_classification":
        inputs = Schema([ColSpec(DataType.string, TEXT_COLUMN)])
    else:
        inputs = Schema([ColSpec(DataType.binary, IMAGE_COLUMN)])
    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.long, "class_index"),
            ColSpec(DataType.double, "probability"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(pre: PreprocessingConfig) -> Any:
    """A one-row DataFrame the model accepts: a PNG at the model's size, or a short text."""
    import pandas as pd

    if pre.task_type == "text_classification":
        return pd.DataFrame({TEXT_COLUMN: [EXAMPLE_TEXT]})
    from PIL import Image

    h, w = pre.image_size or (28, 28)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pre.channels or 1]
    buf = io.BytesIO()
    Image.new(mode, (w, h), color=(128,) * len(mode)).save(buf, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buf.getvalue()]})


def pip_requirements(directory: str | Path, pre: PreprocessingConfig) -> list[str]:
    """What the pyfunc needs: dlpipe's serving stack; its training stack when only PyTorch
    weights are there (the network is rebuilt from dlpipe's model catalogue)."""
    from mlflow.utils.requirements_utils import _get_pinned_requirement

    d = Path(directory)
    torch_only = not (d / _ONNX_FILE).is_file()
    extras = "serve,train" if torch_only else "serve"
    reqs = [f"dlpipe[{extras}]=={importlib.metadata.version('dlpipe')}"]
    packages = ["onnxruntime", "numpy", "pandas", "pillow"]
    if pre.task_type == "text_classification":
        packages.append("tokenizers")
    if torch_only:
        packages.append("torch")
    return reqs + [_get_pinned_requirement(p) for p in packages]


def write_mlflow_model(package_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write the MLflow model files for the package at `package_dir` (into `out_dir`, default
    the package itself); returns the MLmodel path. Reads only the package's own files."""
    import yaml
    from mlflow import pyfunc
    from mlflow.models import Model
    from mlflow.models.utils import _save_example
    from mlflow.utils.environment import (
        _CONDA_ENV_FILE_NAME,
        _PYTHON_ENV_FILE_NAME,
        _REQUIREMENTS_FILE_NAME,
        _process_pip_requirements,
        _PythonEnv,
    )

    src = Path(package_dir)
    if not is_loadable_package(src):
        raise ValueError(f"{src}: neither {_ONNX_FILE} nor {_WEIGHTS_FILE} with {_CONFIG_FILE}")
    out = Path(out_dir) if out_dir is not None else src
    out.mkdir(parents=True, exist_ok=True)
    pre = package_preprocessing(src)
    model = Model(signature=model_signature(pre), metadata=_dlpipe_metadata(src, pre))
    _save_example(model, input_example(pre), str(out))
    pyfunc.add_to_model(
        model, loader_module=LOADER_MODULE, data=".",
        conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME,
    )  # fmt: skip
    if (src / _ONNX_FILE).is_file():
        import onnx

        # The graph itself is the onnx flavor's data: mlflow.onnx.load_model reads it as is.
        model.add_flavor(
            "onnx", onnx_version=onnx.__version__, data=_ONNX_FILE,
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )  # fmt: skip
    model.model_size_bytes = sum(f.stat().st_size for f in src.iterdir() if f.is_file())
    model.save(str(out / MLMODEL_FILE))
    conda_env, requirements, _ = _process_pip_requirements(pip_requirements(src, pre))
    (out / _CONDA_ENV_FILE_NAME).write_text(yaml.safe_dump(conda_env, default_flow_style=False))
    (out / _REQUIREMENTS_FILE_NAME).write_text("\n".join(requirements) + "\n")
    _PythonEnv.current().to_yaml(str(out / _PYTHON_ENV_FILE_NAME))
    return out / MLMODEL_FILE


def _dlpipe_metadata(directory: Path, pre: PreprocessingConfig) -> dict[str, Any]:
    """What MLflow-aware tools show about the model (the full metadata stays in metadata.json)."""
    info: dict[str, Any] = {"task_type": pre.task_type, "class_names": list(pre.class_names or [])}
    if (directory / _METADATA_FILE).is_file():
        meta = ModelMetadata.from_json((directory / _METADATA_FILE).read_text())
        info.update(
            model_name=meta.model_name,
            framework=meta.framework,
            precision=meta.precision,
            parent_version=meta.parent_version,
        )
    return {"dlpipe": info}
