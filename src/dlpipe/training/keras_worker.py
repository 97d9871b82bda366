"""The TensorFlow side of `train_keras`: one process per worker, started by `keras_fit`.

    python -m dlpipe.training.keras_worker JOB_DIR RANK

Reads `JOB_DIR/job.json` (config, world size, ports, checkpoint directory, resume checkpoint)
and `JOB_DIR/data.npz` (raw uint8 images or texts and labels of each split, written by the
parent from the DataModule), preprocesses with the same `DataPreprocessor` as the PyTorch path,
trains with `model.fit` one epoch per call (so every epoch gets its own order and augmentation
draws from `keras_data.epoch_plan`), and writes back, from rank 0 only: `metrics.jsonl` (one line
per epoch), checkpoints with sidecars, `model.keras` (the tested model, no optimizer),
`model_summary.txt` and `result.json`. This process must never import torch: `import tensorflow`
followed by `import torchvision` crashes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.config import PipelineConfig
from dlpipe.data.preprocessing import AugmentParams, DataPreprocessor
from dlpipe.training.keras_checkpoint import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    publish_checkpoint,
    read_state,
)
from dlpipe.training.keras_data import (
    EpochPlan,
    batches_per_epoch,
    classification_metrics,
    epoch_plan,
)
from dlpipe.training.keras_recipe import (
    configure_tensorflow,
    exit_with_parent,
    learning_rate,
    make_strategy,
    restore_seed_states,
    seed_states,
    set_threads,
)

JOB_FILE = "job.json"
DATA_FILE = "data.npz"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
MODEL_FILE = "model.keras"
SUMMARY_FILE = "model_summary.txt"
EVAL_BATCH = 512


class Worker:
    """One worker's training run; rank 0 writes every file the parent reads."""

    def __init__(self, job_dir: Path, rank: int):
        self.job_dir, self.rank = job_dir, rank
        self.job: dict[str, Any] = json.loads((job_dir / JOB_FILE).read_text())
        self.cfg = PipelineConfig.model_validate(self.job["config"])
        self.world = int(self.job["world"])
        self.chief = rank == 0
        self.pre = DataPreprocessor(self.cfg.preprocessing)
        self.num_classes = self.cfg.model.num_classes

    # -- data ------------------------------------------------------------------------------

    def load_data(self) -> None:
        with np.load(self.job_dir / DATA_FILE, allow_pickle=False) as data:
            raw = {k: data[k] for k in data.files}
        self.labels = {s: raw[f"{s}_y"].astype(np.int64) for s in ("train", "val", "test")}
        self.inputs: dict[str, Any]
        if self.pre.is_text:
            self.inputs = {s: self._tokens(raw[f"{s}_x"]) for s in ("train", "val", "test")}
        else:
            self.train_images = raw["train_x"]
            self.inputs = {s: self.pre.normalize(raw[f"{s}_x"]) for s in ("val", "test")}

    def _tokens(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(texts) == 0:
            empty = np.zeros((0, self.cfg.preprocessing.max_sequence_length or 1), np.int64)
            return empty, empty
        encoded = self.pre.tokenize([str(t) for t in texts])
        return encoded["input_ids"], encoded["attention_mask"]

    def epoch_inputs(self, plan: EpochPlan) -> Any:
        """This worker's training inputs for one epoch (augmented images or token ids)."""
        if self.pre.is_text:
            ids, mask = self.inputs["train"]
            return ids[plan.order], mask[plan.order]
        params = AugmentParams(plan.flip, plan.shift)
        return self.pre.train_batch(self.train_images[plan.order], params=params)

    # -- model -----------------------------------------------------------------------------

    def build(self, strategy: Any, steps_per_epoch: int) -> Any:
        import keras

        from dlpipe.models.keras import build_keras_model

        t = self.cfg.training
        extra: dict[str, Any] = {}
        if self.pre.is_text:
            from tokenizers import Tokenizer

            assert self.pre.tokenizer_file is not None
            extra["vocab_size"] = Tokenizer.from_file(str(self.pre.tokenizer_file)).get_vocab_size()
        elif self.world > 1:
            extra["sync_batchnorm"] = True  # same moving statistics on every worker
        # Keras schedules count batches, also under gradient accumulation (max_steps counts
        # optimizer updates, as in Lightning).
        total = t.num_epochs * steps_per_epoch
        if t.max_steps > 0:
            total = min(total, t.max_steps * t.accumulate_grad_batches)
        with strategy.scope():
            model = build_keras_model(self.cfg, **extra)
            optimizer = keras.optimizers.AdamW(
                learning_rate(self.cfg, total_batches=total),
                weight_decay=t.weight_decay,
                global_clipnorm=t.gradient_clip_val,
                gradient_accumulation_steps=(
                    t.accumulate_grad_batches if t.accumulate_grad_batches > 1 else None
                ),
            )
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
                jit_compile=False,  # XLA on CPU: 4x slower for this CNN (measured)
            )
        return model

    def logits(self, model: Any, inputs: Any) -> np.ndarray:
        """Inference-mode logits, in this process only (no collective ops)."""
        n = len(inputs[0]) if isinstance(inputs, tuple) else len(inputs)
        out = []
        for start in range(0, n, EVAL_BATCH):
            part = slice(start, start + EVAL_BATCH)
            batch = [a[part] for a in inputs] if isinstance(inputs, tuple) else inputs[part]
            out.append(np.asarray(model(batch, training=False), dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)

    # -- training loop ---------------------------------------------------------------------

    def run(self) -> None:
        import keras
        import tensorflow as tf

        t = self.cfg.training
        gpus = tf.config.list_physical_devices("GPU")
        if t.num_gpus > len(gpus):
            raise SystemExit(
                f"training.num_gpus={t.num_gpus} but TensorFlow sees {len(gpus)} GPU(s) here"
            )
        set_threads(tf, self.world)
        keras.utils.set_random_seed(t.seed)
        if t.deterministic:
            tf.config.experimental.enable_op_determinism()
        if t.precision == "bf16-mixed":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        elif t.precision == "16-mixed":
            keras.mixed_precision.set_global_policy("mixed_float16")
        strategy = make_strategy(self.world)
        self.load_data()
        n_train = len(self.labels["train"])
        per_worker = -(-n_train // self.world)
        steps = batches_per_epoch(per_worker, t.batch_size, t.limit_train_batches)
        run_dir = Path(self.job["checkpoint_dir"])
        if self.job.get("resume"):
            with strategy.scope():
                model = keras.models.load_model(self.job["resume"])
            state = read_state(self.job["resume"])
            restore_seed_states(model, state["seed_states"])
        else:
            model = self.build(strategy, steps)
            state = {"epoch": 0, "best": None, "best_epoch": None, "wait": 0, "history": []}
        start = time.monotonic()
        while state["epoch"] < t.num_epochs:
            if t.max_steps > 0 and int(model.optimizer.iterations.numpy()) >= t.max_steps:
                break
            epoch = int(state["epoch"])
            record = self.train_epoch(model, strategy, epoch, steps)
            record.update(self.validate(model, strategy))
            stop = self.track_best(state, record)
            state["epoch"] = epoch + 1
            state["history"].append(record)
            self.save_checkpoints(model, run_dir, state, improved=state["best_epoch"] == epoch)
            if self.chief:
                with open(self.job_dir / METRICS_FILE, "a") as handle:
                    handle.write(json.dumps({"epoch": epoch, **record}) + "\n")
            if stop or state["epoch"] >= (self.job.get("stop_after_epochs") or t.num_epochs):
                break
        if self.chief:
            self.finish(model, run_dir, state, time.monotonic() - start)

    def train_epoch(self, model: Any, strategy: Any, epoch: int, steps: int) -> dict[str, float]:
        import tensorflow as tf

        t = self.cfg.training
        pad = getattr(self.pre, "crop_padding", 1)
        n_train = len(self.labels["train"])
        plan = epoch_plan(n_train, t.seed, epoch, self.world, pad).shard(self.rank)
        keep = slice(0, steps * t.batch_size)
        plan = EpochPlan(plan.order[keep], plan.flip[keep], plan.shift[keep], 1)
        if t.max_steps > 0:  # the last epoch may stop early
            left = t.max_steps - int(model.optimizer.iterations.numpy())
            steps = max(1, min(steps, left * t.accumulate_grad_batches))
        x, y = self.epoch_inputs(plan), self.labels["train"][plan.order]
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(t.batch_size).prefetch(2)
        data: Any = dataset
        if self.world > 1:  # each worker feeds its own share, batch_size per worker (as DDP)
            data = strategy.distribute_datasets_from_function(lambda _: dataset)
        history = model.fit(
            data,
            epochs=epoch + 1,
            initial_epoch=epoch,
            steps_per_epoch=steps,
            shuffle=False,  # the epoch plan already shuffled
            verbose=0,
        )
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        lr = model.optimizer.learning_rate
        return {
            "train/loss": logs["loss"],
            "train/acc": logs["acc"],
            "train/lr": float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr)),
        }

    def validate(self, model: Any, strategy: Any) -> dict[str, float]:
        n = len(self.labels["val"])
        if n == 0:
            return {}
        t = self.cfg.training
        keep = slice(0, batches_per_epoch(n, t.batch_size, t.limit_val_batches) * t.batch_size)
        inputs = self.inputs["val"]
        inputs = tuple(a[keep] for a in inputs) if isinstance(inputs, tuple) else inputs[keep]
        metrics, _ = classification_metrics(
            self.logits(model, inputs), self.labels["val"][keep], self.num_classes
        )
        values = np.array([metrics["loss"], metrics["acc"], metrics["f1"]], dtype=np.float64)
        if self.world > 1:
            # Every worker must take the same early-stopping decision, or one would wait for
            # the others forever: agree on the mean (equal anyway with synchronized BN).
            import tensorflow as tf

            agreed = strategy.reduce("MEAN", tf.constant(values), axis=None)
            values = np.asarray(agreed.numpy(), dtype=np.float64)
        return {"val/loss": values[0], "val/acc": values[1], "val/f1": values[2]}

    def track_best(self, state: dict[str, Any], record: dict[str, float]) -> bool:
        """Update the best monitored value; True when early stopping says stop."""
        t = self.cfg.training
        value = record.get(t.monitor)
        if value is None or not math.isfinite(value):
            return False
        best = state["best"]
        better = best is None or (value > best if t.monitor_mode == "max" else value < best)
        if better:
            state["best"], state["best_epoch"], state["wait"] = value, len(state["history"]), 0
        else:
            state["wait"] += 1
        patience = t.early_stopping_patience
        return patience is not None and state["wait"] >= patience

    def save_checkpoints(
        self, model: Any, run_dir: Path, state: dict[str, Any], improved: bool
    ) -> None:
        """`last.keras` every epoch, `best.keras` when the monitor improved (save_top_k >= 1).

        Every worker saves (reading distributed variables may need all of them); only rank 0
        keeps its file, the others write into a temp directory.
        """
        full = {**state, "seed_states": seed_states(model), "config": self.job["config"]}
        targets = [LAST_CHECKPOINT] + ([BEST_CHECKPOINT] if improved and self.keep_best else [])
        target_dir = run_dir if self.chief else Path(tempfile.mkdtemp(prefix="dlpipe-worker-"))
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in targets:
            staged = target_dir / f".{name}.{os.getpid()}.staged.keras"
            model.save(staged)
            publish_checkpoint(staged, target_dir / name, full)
        if not self.chief:
            shutil.rmtree(target_dir, ignore_errors=True)

    @property
    def keep_best(self) -> bool:
        return self.cfg.training.save_top_k >= 1 and len(self.labels["val"]) > 0

    def finish(self, model: Any, run_dir: Path, state: dict[str, Any], seconds: float) -> None:
        """Test the best checkpoint (else the last) and write the files the parent reads."""
        import keras

        best = run_dir / BEST_CHECKPOINT
        tested = best if self.keep_best and best.is_file() else run_dir / LAST_CHECKPOINT
        # A plain copy outside any strategy: testing runs in this process only.
        net = keras.models.load_model(tested, compile=False)
        metrics, counts = classification_metrics(
            self.logits(net, self.inputs["test"]), self.labels["test"], self.num_classes
        )
        net.save(self.job_dir / MODEL_FILE)  # uncompiled: no optimizer state in the package
        lines: list[str] = []
        net.summary(print_fn=lambda line, *_, **__: lines.append(line), line_length=100)
        (self.job_dir / SUMMARY_FILE).write_text("\n".join(lines) + "\n")
        result = {
            "test": {f"test/{k}": v for k, v in metrics.items()},
            "confusion": counts.tolist(),
            "epochs": int(state["epoch"]),
            "best_checkpoint": str(best) if tested == best else None,
            "last_checkpoint": str(run_dir / LAST_CHECKPOINT),
            "tested_checkpoint": str(tested),
            "train_seconds": seconds,
            "steps": int(model.optimizer.iterations.numpy()),
        }
        (self.job_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m dlpipe.training.keras_worker JOB_DIR RANK", file=sys.stderr)
        return 2
    job_dir, rank = Path(args[0]), int(args[1])
    exit_with_parent()
    configure_tensorflow(json.loads((job_dir / JOB_FILE).read_text()), rank)
    Worker(job_dir, rank).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
