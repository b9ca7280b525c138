"""Checkpoints of everything a run needs to resume, written at the end of every good epoch."""

import math
import os
import re
import signal
import time
from typing import Optional

import keras
import tensorflow as tf
from absl import logging

from dc_core import fileio
from dc_tf import failpoints

# The files of checkpoint N (RunCheckpoint.save numbers each by its completed epochs).
_CHECKPOINT_FILE = re.compile(r"ckpt-(\d+)\.(?:index|data-\d+-of-\d+)")


def checkpoint_numbers(directory: str) -> list:
    """The numbers of the checkpoints that have files in `directory`, newest first, whether or
    not they load."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted({int(m.group(1)) for m in map(_CHECKPOINT_FILE.fullmatch, names) if m},
                  reverse=True)


def _load_error(path: str) -> Optional[str]:
    """Why the checkpoint at `path` does not load (None: every tensor reads back, checksums
    included)."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    # A truncated data file raises IndexError from the reader's bindings, not an OpError.
    except (tf.errors.OpError, IndexError) as e:
        return " ".join(str(getattr(e, "message", e)).split())[:200]
    return None


def _indexed(directory: str) -> Optional[str]:
    """The checkpoint the `checkpoint` index file names as the latest (None: no index, or one
    that does not parse)."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except (tf.errors.OpError, ValueError):  # bytes that are not UTF-8
        return None
    return None if state is None else state.model_checkpoint_path


def newest_that_loads(directory: str) -> Optional[str]:
    """The newest checkpoint in `directory` that loads whole, or None.

    Found from the checkpoint files themselves, not only from the `checkpoint` index, which a
    garbled or lost index would make skip every checkpoint; every tensor is read back first, so
    that a truncated newest checkpoint gives way to the one before it instead of failing the
    restore halfway. Logs which one is taken and why, when it is not simply the indexed one.
    """
    failures = []
    for number in checkpoint_numbers(directory):
        path = os.path.join(directory, f"ckpt-{number}")
        error = _load_error(path)
        if error is not None:
            failures.append(f"ckpt-{number} does not load ({error})")
            continue
        if failures:
            logging.warning("%s: resuming from ckpt-%d", "; ".join(failures), number)
        elif _indexed(directory) != path:
            logging.warning("%s does not name ckpt-%d (it is missing, garbled or stale): "
                            "resuming from ckpt-%d, the newest checkpoint file",
                            os.path.join(directory, "checkpoint"), number, number)
        return path
    if failures:
        logging.warning("%s: no checkpoint to resume from", "; ".join(failures))
    return None


def completed_epochs(path: str) -> int:
    """The number of completed epochs the checkpoint at `path` holds."""
    reader = tf.train.load_checkpoint(path)
    return int(reader.get_tensor("epochs_done/.ATTRIBUTES/VARIABLE_VALUE"))


def repair_index(directory: str, path: str) -> None:
    """Makes the `checkpoint` index name `path` as the latest, after the checkpoints before it,
    when it names another one or cannot be read: the CheckpointManager takes its list from the
    index, to delete the oldest checkpoints (and fails on an index that is not UTF-8)."""
    if _indexed(directory) == path:
        return
    number = int(path.rsplit("-", 1)[1])
    kept = [n for n in reversed(checkpoint_numbers(directory)) if n <= number]
    # The CheckpointState text format, paths relative to `directory` as the manager writes
    # them; the manager deletes only checkpoints with a timestamp.
    now = time.time()
    fileio.atomic_write(os.path.join(directory, "checkpoint"), "".join(
        [f'model_checkpoint_path: "ckpt-{number}"\n']
        + [f'all_model_checkpoint_paths: "ckpt-{n}"\n' for n in kept]
        + [f"all_model_checkpoint_timestamps: {now}\n" for _ in kept]))


class RunCheckpoint:
    """The model (backbone, top layer, pseudo-labels, sampler state, random generators), both
    optimizers and the number of completed epochs, under `directory` via tf.train.CheckpointManager.

    The manager writes the checkpoint files first and the `checkpoint` index last, and
    `restore` takes the newest checkpoint whose files load whatever the index says, so a run
    killed while saving, or one whose newest checkpoint or index is damaged, resumes from the
    newest complete checkpoint.

    Args:
      model: the compiled DeepClusterModel.
      directory: where checkpoints are written.
      max_to_keep: how many checkpoints the manager keeps.
      restore_from: where to restore from when not `directory`: a non-chief worker writes into
        its scratch folder but resumes from the chief's checkpoints, like every other worker.
    """

    def __init__(self, model: keras.Model, directory: str, max_to_keep: int = 2,
                 restore_from: str = ""):
        self.model, self.directory = model, directory
        self._restore_from = restore_from
        self.epochs_done = tf.Variable(0, dtype=tf.int64, trainable=False)
        # Keras's SeedGenerator states (dropout masks, the top layer's re-initialisations) are
        # model variables that tf.train.Checkpoint does not reach through the model: saved too,
        # so that a resumed run draws what an uninterrupted one would.
        seed_states = [v for v in model.variables if v.name == "seed_generator_state"]
        # DeepClusterV2Model has no top layer, so no head optimizer.
        head = ({"head_optimizer": model.head_optimizer}
                if getattr(model, "head_optimizer", None) is not None else {})
        self._ckpt = tf.train.Checkpoint(model=model, backbone_optimizer=model.optimizer,
                                         seed_states=seed_states, epochs_done=self.epochs_done,
                                         **head)
        self._manager = tf.train.CheckpointManager(self._ckpt, directory, max_to_keep=max_to_keep)

    def restore(self, path: Optional[str] = None) -> int:
        """Restores `path`, by default the newest checkpoint that loads (`newest_that_loads`);
        returns the number of completed epochs (0: nothing to restore)."""
        path = path or newest_that_loads(self._restore_from or self._manager.directory)
        if path is None:
            return 0
        self._ckpt.restore(path).assert_existing_objects_matched()
        epochs_done = int(self.epochs_done.numpy())  # int() takes no mirrored variable
        logging.info("resumed from %s (%d epochs done)", path, epochs_done)
        return epochs_done

    def save(self, epochs_done: int) -> str:
        self.epochs_done.assign(epochs_done)
        # The write callback runs once the checkpoint's files are complete, before the manager
        # points the `checkpoint` index at them.
        options = tf.train.CheckpointOptions(
            experimental_write_callbacks=[lambda _: failpoints.reach("checkpoint.written")])
        path = self._manager.save(checkpoint_number=epochs_done, options=options)
        failpoints.reach("checkpoint.saved")
        return path


class NonFiniteLossError(RuntimeError):
    """Training diverged; the checkpoint of the last good epoch is intact."""


class CheckpointCallback(keras.callbacks.Callback):
    """Saves after every epoch whose loss is finite; otherwise stops training without saving.

    SIGTERM (preemption) ends the epoch at the next step and saves it as it stands; the next run
    continues with the following epoch, and `preempted` says so after fit() returns. A loss that
    is not finite ends fit() with a NonFiniteLossError that says how to resume from the last good
    epoch (`learning_rate`: the run's, which the message suggests lowering).
    """

    def __init__(self, checkpoint: RunCheckpoint, learning_rate: float):
        super().__init__()
        self.checkpoint, self.learning_rate = checkpoint, learning_rate
        self.diverged_at = None
        self.preempted = False
        self._previous_handler = None

    def _on_sigterm(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the end of this step")
        self.preempted = True

    def on_train_begin(self, logs=None):
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, logs=None):
        signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
        if self.diverged_at is not None:
            raise NonFiniteLossError(
                f"the loss became non-finite in epoch {self.diverged_at}; the checkpoint of the "
                f"last good epoch is intact in {self.checkpoint.directory}. Lower --learning_rate "
                f"(now {self.learning_rate}) and re-run the same command to resume from it.")
        if self.preempted:
            logging.warning("stopped by SIGTERM: the checkpoint after epoch %d is saved; re-run "
                            "the same command to continue",
                            int(self.checkpoint.epochs_done.numpy()) - 1)

    def on_train_batch_end(self, batch, logs=None):
        failpoints.reach("train.batch")
        # Only the flag: reading the loss here would wait for every step to finish on the host.
        # A non-finite loss is caught at the end of the epoch, which is then not saved.
        if self.preempted:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if not math.isfinite(float(logs["loss"])):
            self.diverged_at = epoch
            self.model.stop_training = True
            return
        self.checkpoint.save(epoch + 1)
