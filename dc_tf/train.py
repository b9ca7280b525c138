r"""DeepCluster training: data -> model -> callbacks -> fit -> export.

    python -m dc_tf.train --flagfile=flags/fashion_mnist.cfg --model_dir=runs/fmnist
    python -m dc_tf.train --flagfile=flags/alexnet.cfg --data_dir=/data/tfds --model_dir=runs/alexnet

Re-running a command with the same --model_dir resumes from its last checkpoint. Watch a run with
`tensorboard --logdir=MODEL_DIR/logs`. --strategy=mirrored or multi_worker spreads training and the
feature pass over devices or workers (dc_tf/distribute.py).
"""

import errno
import os
import sys
import time
from typing import Optional

from dc_tf import console

console.quiet_tensorflow_startup()  # before TensorFlow loads, which the imports below do

import keras
import tensorflow as tf
from absl import app, flags, logging

from dc_tf import config, data, methods, models, report, train_flags
from dc_tf.checkpoint import CheckpointCallback, NonFiniteLossError
from dc_tf.data import pipelines
from dc_tf.distribute import Workers
from dc_tf.export import export_saved_model
from dc_tf.monitor import RunLogger
from dc_tf.recluster import FinalClustering
from dc_tf.report import ReportCallback
from dc_tf.run_dir import RunDir
from dc_tf.visualization.cluster_montage import ClusterMontageCallback


def run(cfg: config.TrainConfig, overwrite: bool = False) -> config.TrainConfig:
    """Trains cfg.method as configured and exports the network to MODEL_DIR/export.

    Args:
      cfg: a validated configuration.
      overwrite: delete a run with another configuration found in MODEL_DIR instead of refusing.
    Returns:
      The resolved configuration (with the dataset's channels and size), as in config.json.
    """
    # Configuration and data.
    workers = Workers(cfg)
    config.check_model_dir(cfg.model_dir)  # before the data: loading it may take minutes
    source = data.open_source(cfg.dataset, cfg.data_dir, cfg.max_examples)
    method = methods.for_config(cfg)
    cfg = method.resolve(source)
    keras.utils.set_random_seed(cfg.seed)
    with models.precision_policy("mixed_bfloat16" if cfg.mixed_precision else "float32"):
        # Model.
        try:
            with workers.scope():
                backbone = method.backbone()
        except ValueError as e:  # --image_size too small for --arch, --mean of the wrong length
            raise config.ConfigError(str(e)) from e
        method.check(backbone)
        with workers.claimed(cfg, overwrite) as resume_from:
            if workers.chief:
                data.write_index_map(source, workers.run.examples)
            _log_start(cfg, source, workers)
            model, checkpoint, epochs_done = method.restored_model(backbone, workers, resume_from)
            # Callbacks and fit.
            labeller = method.labeller(source, model, workers, epochs_done)
            saver = CheckpointCallback(checkpoint, cfg.learning_rate)
            _fit(method, model, source, workers, labeller, saver, epochs_done)
            if saver.preempted:
                return cfg
            # Final clustering and export.
            labeller.set_model(model)  # a re-run with every epoch trained did not call fit()
            final = _final(cfg, labeller, workers) if method.clusters else None
            _list_skipped(source, labeller, workers)
            _export(method, model, final, workers, source)
    return cfg


def _log_start(cfg: config.TrainConfig, source: data.Source, workers: Workers) -> None:
    logging.debug("configuration:\n%s", cfg.to_json())
    logging.info("%s: %s on %s (%d images, %d channel(s)), %d epochs of batch %d; every setting "
                 "in %s", cfg.model_dir, cfg.method, source.name, source.num_examples,
                 source.channels, cfg.epochs, cfg.batch_size, workers.chief_run.config)
    workers.log_devices()


def _fit(method: methods.Method, model: keras.Model, source: data.Source, workers: Workers,
         labeller: keras.callbacks.Callback, saver: CheckpointCallback, epochs_done: int) -> None:
    """Trains the epochs not done yet. The labeller comes first (its epoch's targets before the
    epoch's steps), the checkpoint saver last (after the epoch's figures and report)."""
    cfg = method.cfg
    run_dir = workers.run.path
    montage = method.clusters and workers.chief
    callbacks = [labeller,
                 *([ClusterMontageCallback(source, run_dir, cfg.seed)] if montage else []),
                 RunLogger(run_dir, labeller, cfg.batch_size, method.steps_per_epoch),
                 *([ReportCallback(run_dir, source)] if workers.chief else []),
                 saver]
    if epochs_done >= cfg.epochs:
        return
    logging.info("training epochs %d..%d, %s", epochs_done, cfg.epochs - 1,
                 method.training_line())
    # No steps_per_epoch: with it, Keras would keep one iterator across epochs, and batches
    # drawn before a reclustering would be trained on after it (training_dataset).
    model.fit(method.training_data(source, model, workers), epochs=cfg.epochs,
              initial_epoch=epochs_done, callbacks=callbacks, shuffle=False,
              verbose=1 if console.interactive() else 0)  # else RunLogger's line a minute


def _final(cfg: config.TrainConfig, labeller, workers: Workers) -> FinalClustering:
    """The clustering of the trained network: the one a previous run saved, else a new one
    (whose pass over the images lists those that became unreadable after the last epoch's)."""
    final = FinalClustering.load(workers.run, cfg.epochs)
    # Every worker takes part in the labeller's collectives (feature pass, statistics) when the
    # chief clusters anew.
    if not workers.from_chief(int(final is not None)):
        final = labeller.cluster_final(cfg.epochs)
    return final


def _list_skipped(source: data.Source, labeller, workers: Workers) -> None:
    """Lists the images the labeller's last pass could not read, if any."""
    if len(labeller.skipped):
        data.write_skipped(source, labeller.skipped, workers.run.skipped)
        logging.warning("%d unreadable images were skipped (listed with the reason in %s), "
                        "e.g. %s", len(labeller.skipped), workers.run.skipped,
                        ", ".join(source.describe(int(i)) for i in labeller.skipped[:5]))


def _export(method: methods.Method, model: keras.Model, final: Optional[FinalClustering],
            workers: Workers, source: data.Source) -> None:
    """The chief exports the method's network (its `assign` signature reads the method's
    assign endpoint), then writes the run's report once more, now with the final clustering."""
    if not workers.chief:
        logging.info("worker done: the chief exports to %s", workers.chief_run.export)
        return
    cfg, network = method.cfg, method.exported(model)
    path = export_saved_model(network, workers.run.export, cfg.image_size, cfg.channels,
                              models.min_image_size(cfg.arch), method.assign_endpoint, final,
                              method="supervised" if cfg.supervised else cfg.method,
                              arch=cfg.arch)
    logging.info("exported %s to %s", ", ".join(sorted(network.output)), path)
    report.write_run_report(workers.run.path, source)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    console.quiet_library_info()
    start = time.time()
    try:
        cfg = run(config.validate(train_flags.config_from_flags()), overwrite=flags.FLAGS.overwrite)
    except Exception as e:  # noqa: BLE001  those with a message for the user end here
        message = _message(e)
        if message is None:
            raise
        logging.error("%s", message)
        sys.exit(f"error: {message}")
    if os.path.isdir(RunDir(cfg.model_dir).export):
        print(console.closing_block(cfg, time.time() - start))


def _message(error: Exception) -> Optional[str]:
    """The one-line message of an error the user can act on (None: a bug, shown as raised)."""
    if isinstance(error, (config.ConfigError, data.DatasetNotFoundError, NonFiniteLossError)):
        return str(error)
    if isinstance(error, tf.errors.InvalidArgumentError) and pipelines.short_epoch(error):
        return pipelines.short_epoch(error)  # the data of an epoch ran short
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or (
            isinstance(error, tf.errors.OpError)
            and any(words in str(error) for words in ("No space left", "Disk quota exceeded"))):
        return (f"the filesystem of --model_dir={flags.FLAGS.model_dir} is full "
                f"({' '.join(str(error).split())[:300]}). What was saved before is intact: free "
                "some space (or move the folder) and re-run the same command to resume.")
    return None


def entry_point():
    """The `dc-tf-train` console script."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
