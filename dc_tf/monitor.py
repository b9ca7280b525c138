"""RunLogger: one row of the run's metrics and a set of TensorBoard summaries per epoch."""

import math
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dc_tf import console, failpoints
from dc_tf.console import figure
from dc_tf.recluster import ReclusterCallback
from dc_tf.run_dir import RunDir


# The figures of the one line logged per epoch (all of them are in the metrics rows).
_EPOCH_LINE = ("loss", "accuracy", "nmi_prev", "nmi_labels", "empty_clusters")


def _finite_or_none(value):
    return None if value is None or not math.isfinite(value) else value


class RunLogger(keras.callbacks.Callback):
    """Writes the epoch's training and clustering figures to the run's metrics and TensorBoard.

    Args:
      model_dir: the run folder (RunDir: its metrics and logs).
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
        self.run = RunDir(model_dir)
        self.writer = tf.summary.create_file_writer(self.run.logs)
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
        self.run.append_metrics(row)
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
