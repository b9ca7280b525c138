"""RunLogger: one `metrics.jsonl` line and a set of TensorBoard summaries per epoch."""

import json
import math
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dc_core import fileio
from dc_tf import console, failpoints
from dc_tf.console import figure
from dc_tf.recluster import ReclusterCallback


def _epoch_of(line: bytes) -> Optional[int]:
    """The epoch of a metrics.jsonl line (None: not a whole row: cut short or garbled)."""
    try:
        row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
    except ValueError:
        return None
    epoch = row.get("epoch") if isinstance(row, dict) else None
    return epoch if isinstance(epoch, int) else None


def _read_metrics(path: str) -> list:
    """(line, epoch or None) for every line of metrics.jsonl; [] when there is none."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        return [(line, _epoch_of(line)) for line in f]


def logged_epochs(path: str) -> list:
    """The epochs of metrics.jsonl's whole rows, in file order."""
    return [epoch for _, epoch in _read_metrics(path) if epoch is not None]


def truncate_metrics(path: str, before_epoch: int) -> None:
    """Keeps the rows of epochs before `before_epoch`: drops those of later epochs (written by
    a run killed before their checkpoint, or trained after a checkpoint that no longer loads)
    and, with a warning naming it, any line that is not a whole row (cut short by a kill, or
    garbled), so that the next row starts a line of its own."""
    rows = _read_metrics(path)
    keep = []
    for number, (line, epoch) in enumerate(rows, 1):
        if epoch is None:
            if line.strip():
                logging.warning("%s line %d is not a metrics row, dropped: %r", path, number,
                                line[:80])
        elif epoch < before_epoch:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    if keep != [line for line, _ in rows]:
        fileio.atomic_write(path, b"".join(keep))


# The figures of the one line logged per epoch (all of them are in metrics.jsonl).
_EPOCH_LINE = ("loss", "accuracy", "nmi_prev", "nmi_labels", "empty_clusters")


def _finite_or_none(value):
    return None if value is None or not math.isfinite(value) else value


class RunLogger(keras.callbacks.Callback):
    """Writes the epoch's training and clustering figures to metrics.jsonl and TensorBoard.

    Args:
      model_dir: the run folder (metrics.jsonl, logs/).
      recluster: the ReclusterCallback whose `stats` describe the epoch's clustering.
      batch_size, steps_per_epoch: to count training images.
      log_every_s: seconds between progress lines within an epoch; none on a terminal, where
        Keras's progress bar shows the progress.
    The learning rate logged is the model's optimiser's at the epoch's end.
    """

    def __init__(self, model_dir: str, recluster: ReclusterCallback, batch_size: int,
                 steps_per_epoch: int, log_every_s: float = 60.0):
        super().__init__()
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.log_every_s = None if console.interactive() else log_every_s
        self._last_log, self._epoch, self._steps = 0.0, 0, 0
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self.writer = tf.summary.create_file_writer(os.path.join(model_dir, "logs"))
        self.recluster = recluster
        self._train_start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        # Runs after the ReclusterCallback (listed first), so this times training alone.
        self._train_start = self._last_log = time.time()
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1
        now = time.time()
        if self.log_every_s is not None and now - self._last_log > self.log_every_s:
            self._last_log = now
            rate = (batch + 1) / (now - self._train_start)  # steps per second
            logging.info("epoch %d: step %d/%d, loss %.4f, %.0f images/s, %.0f s left in the "
                         "epoch", self._epoch, batch + 1, self.steps_per_epoch,
                         float(logs["loss"]), rate * self.batch_size,
                         (self.steps_per_epoch - batch - 1) / rate)

    def on_epoch_end(self, epoch, logs=None):
        if not math.isfinite(logs["loss"]):
            return  # the CheckpointCallback stops the run; nothing of this epoch is kept
        seconds = time.time() - self._train_start
        stats = dict(self.recluster.stats)
        sizes = stats.pop("cluster_sizes", None)
        row = {"epoch": epoch, "loss": float(logs["loss"]), "accuracy": float(logs["accuracy"]),
               **stats, "kmeans_loss": _finite_or_none(stats["kmeans_loss"]),
               "skipped_images": int(len(self.recluster.skipped)),
               "steps": self._steps, "time_train_s": seconds,
               "train_images_per_s": self._steps * self.batch_size / seconds,
               "learning_rate": float(tf.convert_to_tensor(
                   self.model.optimizer.learning_rate))}  # a variable, mirrored or not
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        failpoints.reach("epoch.logged")
        with self.writer.as_default(step=epoch):
            for key, value in row.items():
                if key != "epoch" and value is not None:
                    tf.summary.scalar(key, value)
            if sizes is not None:
                tf.summary.histogram("cluster_sizes", np.asarray(sizes, np.float32))
        self.writer.flush()
        if self.log_every_s is None:  # a terminal: end the progress bar's line first
            print(flush=True)
        logging.info("epoch %d: %s; trained in %.0f s (%.0f images/s)", epoch, ", ".join(
            f"{key} {figure(row.get(key))}" for key in _EPOCH_LINE if key in row),
            seconds, row["train_images_per_s"])
