"""Keras 3 (TensorFlow backend) classifiers for the catalogue's `framework="tensorflow"` entries.

    net = keras_cnn(10, in_channels=1, image_size=(28, 28))      # input "input": N×C×H×W float32
    net = keras_text(2, max_sequence_length=64)                   # "input_ids", "attention_mask"

The inputs follow the same contract as the PyTorch models (docs/architecture.md): images arrive
channels-first, exactly as `DataPreprocessor.normalize` and serving produce them, and are turned
to channels-last inside the model (TensorFlow's CPU convolutions want NHWC); text takes int64
`input_ids` and `attention_mask`. The output is named `logits` and stays float32 under mixed
precision. The builders import keras: only TensorFlow processes may call them, never one that
has torch loaded (`import tensorflow` then `import torchvision` crashes). The module itself
imports no framework, so `KERAS_FILE` is importable anywhere (the package code uses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlpipe.config import PipelineConfig

KERAS_FILE = "model.keras"
"""File name of a Keras model inside a model package."""
MINILM_VOCAB_SIZE = 30522  # the WordPiece vocabulary of all-MiniLM-L6-v2 (the `minilm` tokenizer)


def keras_cnn(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    dropout: float = 0.1,
    *,
    image_size: tuple[int, int] | list[int] = (28, 28),
    width: int = 32,
    convs_per_block: int = 1,
    sync_batchnorm: bool = False,
    **_: Any,
) -> Any:
    """Two conv blocks (conv-BN-ReLU × `convs_per_block`, max-pool) and a 128-unit head.

    `convs_per_block=2` is `simple_cnn`'s layout; the default 1 trains about 4× faster on a CPU
    (0.90 on Fashion-MNIST within minutes on 2 cores). `sync_batchnorm` computes batch
    statistics over all workers of a `tf.distribute` strategy, so every worker keeps the same
    moving averages (and the same validation metrics).
    """
    import keras
    from keras import layers

    if pretrained:
        raise ValueError("keras_cnn has no pretrained weights; set model.pretrained=false")
    height, width_px = (int(s) for s in image_size)
    inputs = keras.Input((in_channels, height, width_px), name="input", dtype="float32")
    x = layers.Permute((2, 3, 1), name="to_channels_last")(inputs)
    for block, filters in enumerate((width, 2 * width)):
        for conv in range(convs_per_block):
            x = layers.Conv2D(
                filters, 3, padding="same", use_bias=False, name=f"conv{block}_{conv}"
            )(x)
            # PyTorch's BN momentum (0.1 = Keras 0.9): Keras's 0.99 lags badly in short runs.
            x = layers.BatchNormalization(
                momentum=0.9, synchronized=sync_batchnorm, name=f"bn{block}_{conv}"
            )(x)
            x = layers.ReLU(name=f"relu{block}_{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="dropout0")(x)
    x = layers.Dense(128, activation="relu", name="fc")(x)
    x = layers.Dropout(dropout, name="dropout1")(x)
    # float32 logits whatever the global dtype policy (mixed_bfloat16 computes in bf16).
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name="keras_cnn")


def keras_text(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    dropout: float = 0.1,
    *,
    vocab_size: int = MINILM_VOCAB_SIZE,
    max_sequence_length: int | None = None,
    embed_dim: int = 64,
    filters: int = 128,
    **_: Any,
) -> Any:
    """Embedding → Conv1D → masked mean and max pooling → dense head, over WordPiece ids.

    `max_sequence_length=None` keeps the sequence axis dynamic (exported graphs take any
    length); padding positions (attention_mask 0) never reach the features.
    """
    import keras
    from keras import layers, ops

    if pretrained:
        raise ValueError("keras_text has no pretrained weights; set model.pretrained=false")
    ids = keras.Input((max_sequence_length,), name="input_ids", dtype="int64")
    mask = keras.Input((max_sequence_length,), name="attention_mask", dtype="int64")
    x = layers.Embedding(vocab_size, embed_dim, name="embedding")(ids)
    keep = ops.expand_dims(ops.cast(mask, x.dtype), -1)  # (N, L, 1): 1 for real tokens
    # Padding becomes zeros before the convolution, exactly what its own "same" padding adds
    # at the sequence end: logits do not depend on pad ids nor on how much padding there is.
    x = layers.Dropout(dropout, name="embed_dropout")(x * keep)
    x = layers.Conv1D(filters, 3, padding="same", activation="relu", name="conv")(x)
    count = ops.maximum(ops.sum(keep, axis=1), 1.0)
    mean = ops.sum(x * keep, axis=1) / count
    # Padding gets a large negative value so it never wins the max (ReLU outputs are >= 0).
    peak = ops.max(x * keep - (1.0 - keep) * 1e4, axis=1)
    x = layers.Concatenate(name="pooled")([mean, peak])
    x = layers.Dropout(dropout, name="dropout")(x)
    x = layers.Dense(64, activation="relu", name="fc")(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model([ids, mask], logits, name="keras_text")


def builder_kwargs(cfg: PipelineConfig) -> dict[str, Any]:
    """Shape arguments a Keras builder needs from the config (image size, sequence length)."""
    pre = cfg.preprocessing
    if pre.task_type == "image_classification":
        assert pre.image_size is not None
        return {"image_size": tuple(pre.image_size)}
    return {"max_sequence_length": None}


def build_keras_model(cfg: PipelineConfig, **overrides: Any) -> Any:
    """The configured Keras network (uncompiled), built from the catalogue entry."""
    from dlpipe.models.architectures import get_architecture

    arch = get_architecture(cfg.model.name)
    if arch.framework != "tensorflow":
        raise ValueError(f"model {arch.name!r} is a {arch.framework} model, not a Keras one")
    m = cfg.model
    kwargs = {**builder_kwargs(cfg), **m.extra, **overrides}
    return arch.load_builder()(
        m.num_classes, m.in_channels, pretrained=m.pretrained, dropout=m.dropout, **kwargs
    )
