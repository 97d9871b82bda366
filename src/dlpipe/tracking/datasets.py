"""The training, validation and test splits as `mlflow.data` dataset inputs of a training run.

    log_datasets(client, run_id, datamodule, cfg)

Each split becomes one dataset (`<cfg.name>-<split>`) tagged `mlflow.data.context` =
`training`, `validation` or `test`: images as a `NumpyDataset` (uint8 N×H×W×C features at the
model's input size, int64 targets), texts as a `PandasDataset` (`text`, `label`). Its profile
holds the sizes (shapes, rows, bytes), its source the data's location.

The digest covers every sample's content and label (sha256, first 16 hex digits). MLflow's own
digest hashes only the first 10,000 array elements (about 12 Fashion-MNIST images), so two
training sets differing after their 13th image would look the same.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
from mlflow import MlflowClient

from dlpipe.config import PipelineConfig

SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
"""`raw_samples` split name -> the `mlflow.data.context` tag value."""
DATA_CONTEXT_TAG = "mlflow.data.context"


def content_digest(*parts: np.ndarray | list[str]) -> str:
    """sha256 over arrays (shape, dtype and bytes) and lists of texts; 16 hex digits."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(f"texts{len(part)}".encode())
            for text in part:
                encoded = text.encode("utf-8")
                h.update(len(encoded).to_bytes(8, "little") + encoded)
    return h.hexdigest()[:16]


def data_source(cfg: PipelineConfig) -> str:
    """Where a config's data lives (a local path when there is one; else the source's name)."""
    from dlpipe.data import sources

    data = cfg.data
    try:
        if data.source == "fashion_mnist":
            found = sources.find_fashion_mnist(data.path)
            if found is not None:
                return str(found)
        elif data.source == "rotten_tomatoes":
            return str(sources.rotten_tomatoes_path())
    except (OSError, ValueError):  # the name still says where the data came from
        pass
    return str(data.path or data.source)


def resolved_source(source: str) -> Any:
    """The `DatasetSource` for a path or URI (a local path: MLflow's local artifact source)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow registers its local source for both "" and "file:" URIs and warns that a
        # path matches both; they are the same class.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interp")
        return resolve_dataset_source(source)


def split_dataset(datamodule: Any, split: str, name: str, source: Any) -> Any:
    """One split of a `ClassifierDataModule` as an `mlflow.data` dataset."""
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.data.pandas_dataset import from_pandas

    pairs = datamodule.raw_samples(split)
    labels = np.asarray([label for _, label in pairs], dtype=np.int64)
    if pairs and isinstance(pairs[0][0], str):
        import pandas as pd

        texts = [text for text, _ in pairs]
        frame = pd.DataFrame({"text": texts, "label": labels})
        return from_pandas(
            frame, source=source, targets="label", name=name, digest=content_digest(texts, labels)
        )
    if pairs:
        images = np.stack([np.asarray(image, dtype=np.uint8) for image, _ in pairs])
    else:
        images = np.empty((0, 0, 0, 0), dtype=np.uint8)
    return from_numpy(
        images, source=source, targets=labels, name=name, digest=content_digest(images, labels)
    )


def log_datasets(
    client: MlflowClient, run_id: str, datamodule: Any, cfg: PipelineConfig
) -> dict[str, str]:
    """Log the three splits as dataset inputs of `run_id`; returns context -> digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = resolved_source(data_source(cfg))
    inputs = []
    digests = {}
    for split, context in SPLIT_CONTEXTS.items():
        dataset = split_dataset(datamodule, split, f"{cfg.name}-{split}", source)
        digests[context] = dataset.digest
        with warnings.catch_warnings():
            # Labels are never missing: MLflow's hint about integer columns does not apply.
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            info = dataset.to_dict()  # name, digest, source, source_type, schema, profile
        entity = Dataset(
            name=info["name"], digest=info["digest"], source_type=info["source_type"],
            source=info["source"], schema=info.get("schema"), profile=info.get("profile"),
        )  # fmt: skip
        inputs.append(DatasetInput(entity, tags=[InputTag(DATA_CONTEXT_TAG, context)]))
    client.log_inputs(run_id, datasets=inputs)
    return digests
