"""A model package: the directory a registry version stores (see docs/architecture.md).

<dir>/config.yaml  preprocessing.json  metadata.json  weights.pt | model.keras | model.onnx
     [tokenizer.json]
<dir>/MLmodel  requirements.txt  python_env.yaml  conda.yaml  input_example.json  ...

The package files are what `dlpipe serve` reads; the MLflow files beside them
(`dlpipe.tracking.mlflow_model`) make the same directory an MLflow model (pyfunc + onnx flavors).

Serving imports the file names from here, so torch is imported only by the functions that read
or write weights. A Keras model (framework `tensorflow`) is copied as a file: TensorFlow never
runs in the process that writes or serves a package.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dlpipe.config import PipelineConfig, load_config, save_config
from dlpipe.data.preprocessing import TOKENIZER_FILE  # text packages: <dir>/tokenizer.json
from dlpipe.models.keras import KERAS_FILE  # Keras packages (framework tensorflow): model.keras
from dlpipe.tracking.metadata import ModelMetadata

if TYPE_CHECKING:
    from torch import nn

CONFIG_FILE = "config.yaml"
PREPROCESSING_FILE = "preprocessing.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "weights.pt"
ONNX_FILE = "model.onnx"
MODEL_FILES = (WEIGHTS_FILE, ONNX_FILE, KERAS_FILE)
"""A package holds at least one of these."""


def save_model_package(
    directory: str | Path,
    cfg: PipelineConfig | None,
    metadata: ModelMetadata,
    net: nn.Module | None = None,
    onnx_path: str | Path | None = None,
    tokenizer_file: str | Path | None = None,
    *,
    keras_path: str | Path | None = None,
    mlflow_model: bool = True,
) -> Path:
    """Write a package directory with a PyTorch state_dict, a Keras file and/or an ONNX file.

    A text model's package also gets the tokenizer it was trained with (`tokenizer_file`, else
    the one `cfg.preprocessing.tokenizer_name` names) as `tokenizer.json`.
    `metadata.model_size_mb` is filled from the model files written here when it is 0
    (`package_size_mb`). With `mlflow_model` the MLflow model files (MLmodel, environment,
    input example) are written beside the package files when the pyfunc can run the package
    (an ONNX graph or PyTorch weights; a Keras-only package has no MLmodel).
    `cfg=None` (a model imported with only its preprocessing) writes no config.yaml: the
    preprocessing comes from `metadata`, and with no data config there is nothing to evaluate
    or optimize it on.
    """
    if net is None and onnx_path is None and keras_path is None:
        raise ValueError("a model package needs a network, a Keras file, an ONNX file, or more")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    preprocessing = metadata.preprocessing_config
    if cfg is not None:
        save_config(cfg, out / CONFIG_FILE)
        preprocessing = cfg.preprocessing
    (out / PREPROCESSING_FILE).write_text(preprocessing.model_dump_json(indent=2))
    if preprocessing.task_type == "text_classification":
        from dlpipe.data.preprocessing import DataPreprocessor

        pre = DataPreprocessor(preprocessing, tokenizer_file=tokenizer_file)
        pre.save_tokenizer(out / TOKENIZER_FILE)
    if net is not None:
        import torch

        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(state, out / WEIGHTS_FILE)
    if keras_path is not None:
        src = Path(keras_path)
        if not src.is_file():
            raise FileNotFoundError(f"Keras model file not found: {src}")
        if src.resolve() != (out / KERAS_FILE).resolve():
            shutil.copyfile(src, out / KERAS_FILE)
    if onnx_path is not None:
        src = Path(onnx_path)
        if src.resolve() != (out / ONNX_FILE).resolve():
            copy_onnx(src, out / ONNX_FILE)
    if not metadata.model_size_mb:
        metadata.model_size_mb = package_size_mb(out)
    (out / METADATA_FILE).write_text(metadata.to_json())
    if mlflow_model:
        from dlpipe.tracking.mlflow_model import is_loadable_package, write_mlflow_model

        if is_loadable_package(out):
            write_mlflow_model(out)
    return out


def copy_onnx(src: Path, dst: Path) -> None:
    """Copy an ONNX graph; external weights are re-pointed at `<dst>.data` (or inlined)."""
    import onnx

    model = onnx.load(str(src))  # pulls external tensors in, whatever their file is called
    external = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB ceiling
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=dst.name + ".data",
    )


def package_size_mb(directory: str | Path) -> float:
    """Size of the model file(s) in a package, in MB (10^6 bytes): the ONNX graph (and its
    `.data` side file) when there is one, since that is what serves; else weights.pt and
    model.keras."""
    d = Path(directory)
    files = [d / ONNX_FILE, d / (ONNX_FILE + ".data")]
    if not (d / ONNX_FILE).exists():
        files = [d / WEIGHTS_FILE, d / KERAS_FILE]
    return round(sum(f.stat().st_size for f in files if f.exists()) / 1e6, 4)


def load_package_config(directory: str | Path) -> PipelineConfig:
    return load_config(Path(directory) / CONFIG_FILE)


def load_package_metadata(directory: str | Path) -> ModelMetadata:
    return ModelMetadata.from_json((Path(directory) / METADATA_FILE).read_text())


def load_torch_model(directory: str | Path) -> nn.Module:
    """Rebuild the network from a package's config and load its weights (eval mode)."""
    import torch

    from dlpipe.models import create_model

    d = Path(directory)
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{d} has no {WEIGHTS_FILE} (is it an ONNX-only package?)")
    cfg = load_package_config(d)
    m = cfg.model
    # pretrained=False: the saved weights replace whatever the builder would load.
    net = create_model(
        m.name, m.num_classes, m.in_channels, pretrained=False, dropout=m.dropout, **m.extra
    )
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.eval()
