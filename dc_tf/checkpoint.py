"""Checkpoints of everything a run needs to resume, written at the end of every good epoch."""

import math
import signal

import keras
import tensorflow as tf
from absl import logging

from dc_tf import failpoints


class RunCheckpoint:
    """The model (backbone, top layer, pseudo-labels, sampler state, random generators), both
    optimizers and the number of completed epochs, under `directory` via tf.train.CheckpointManager.

    The manager writes the checkpoint files first and the `checkpoint` index last, so a run
    killed while saving resumes from the previous complete checkpoint.

    Args:
      model: the compiled DeepClusterModel.
      directory: where checkpoints are written.
      max_to_keep: how many checkpoints the manager keeps.
      restore_from: where to restore from when not `directory`: a non-chief worker writes into
        its scratch folder but resumes from the chief's checkpoints, like every other worker.
    """

    def __init__(self, model: keras.Model, directory: str, max_to_keep: int = 2,
                 restore_from: str = ""):
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

    def restore(self) -> int:
        """Restores the latest checkpoint if any; returns the number of completed epochs."""
        path = (tf.train.latest_checkpoint(self._restore_from) if self._restore_from
                else self._manager.latest_checkpoint)
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
    continues with the following epoch. After fit() returns, `diverged_at` is the epoch whose loss
    was not finite (or None) and `preempted` says whether SIGTERM stopped the run.
    """

    def __init__(self, checkpoint: RunCheckpoint):
        super().__init__()
        self.checkpoint = checkpoint
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
