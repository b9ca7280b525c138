r"""DeepCluster training: data -> model -> callbacks -> fit -> export.

    python -m dc_tf.train --flagfile=flags/fashion_mnist.cfg --model_dir=runs/fmnist
    python -m dc_tf.train --flagfile=flags/alexnet.cfg --data_dir=/data/tfds --model_dir=runs/alexnet

Re-running a command with the same --model_dir resumes from its last checkpoint. Watch a run with
`tensorboard --logdir=MODEL_DIR/logs`. --strategy=mirrored or multi_worker spreads training and the
feature pass over devices or workers (dc_tf/distribute.py).
"""

import contextlib
import errno
import math
import os
import sys
import time
from typing import Optional

from dc_tf import console

console.quiet_tensorflow_startup()  # before TensorFlow loads, which the imports below do

import faiss
import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from dc_tf import (config, data, distribute, failpoints, models, optim, report, run_dir,
                   train_flags)
from dc_tf.checkpoint import CheckpointCallback, NonFiniteLossError, RunCheckpoint
from dc_tf.data import pipelines
from dc_tf.export import export_saved_model
from dc_tf.model import DeepClusterV2Model, build_run_model, v2_steps_per_epoch
from dc_tf.monitor import RunLogger, truncate_metrics
from dc_tf.prototypes import PrototypeCallback
from dc_tf.recluster import (Clusterer, FinalClustering, FixedLabelsCallback,
                             ReclusterCallback)
from dc_tf.report import ReportCallback
from dc_tf.visualization.cluster_montage import ClusterMontageCallback


# The feature pass's batch: inference has no reason to use small SGD batches, and larger ones
# run faster. The least multiple of the training batch, which splits evenly over the replicas,
# that holds FEATURE_BATCH images.
FEATURE_BATCH = 256


def feature_batch_size(batch_size: int) -> int:
    return batch_size * math.ceil(FEATURE_BATCH / batch_size)


def run(cfg: config.TrainConfig, overwrite: bool = False) -> config.TrainConfig:
    """Trains DeepCluster as configured and exports the backbone to MODEL_DIR/export.

    Args:
      cfg: a validated configuration.
      overwrite: delete a run with another configuration found in MODEL_DIR instead of refusing.
    Returns:
      The resolved configuration (with the dataset's channels and size), as in config.json.
    """
    # ---------------------------------------------------------------- strategy, data and checks
    strategy = distribute.make_strategy(cfg.strategy)  # first: multi_worker sets up the runtime
    distribute.check_batch_size(strategy, cfg.batch_size)
    config.check_model_dir(cfg.model_dir)  # before the data: loading it may take minutes
    source = data.open_source(cfg.dataset, cfg.data_dir, cfg.max_examples)
    labels = data.all_labels(source) if cfg.supervised else None
    classes = {"num_clusters": int(labels.max()) + 1} if cfg.supervised else {}
    cfg = config.with_data(cfg, source.channels, source.num_examples, **classes)
    keras.utils.set_random_seed(cfg.seed)
    with _precision_policy("mixed_bfloat16" if cfg.mixed_precision else "float32"):
        try:
            with distribute.variable_scope(strategy):
                backbone = models.backbone_of(cfg)
        except ValueError as e:  # --image_size too small for --arch, --mean of the wrong length
            raise config.ConfigError(str(e)) from e
        _check_and_train(cfg, source, backbone, labels, overwrite, strategy)
    return cfg


@contextlib.contextmanager
def _precision_policy(name: str):
    """Keras's global dtype policy for the layers built inside, restored afterwards.

    mixed_bfloat16 computes in bfloat16 and keeps float32 variables; bfloat16 has float32's
    exponent range, so no loss scaling is needed. The top layer and the clustering features
    stay float32 (DeepClusterModel, the feature pass).
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _check_and_train(cfg: config.TrainConfig, source: data.Source, backbone: keras.Model,
                     labels: Optional[np.ndarray], overwrite: bool,
                     strategy: tf.distribute.Strategy) -> None:
    """Checks the configuration against the data and the network, then trains in MODEL_DIR.

    Only the chief locks and claims MODEL_DIR; another worker locks its scratch folder.
    """
    cluster_endpoint = models.cluster_endpoint(cfg.arch)
    if not cfg.supervised:
        config.check_against_data(cfg, backbone.output[cluster_endpoint].shape[-1])
        if cfg.method == "deepcluster" and cfg.num_examples < 39 * cfg.num_clusters:
            logging.warning("%d images for --num_clusters=%d is fewer than the 39 per cluster "
                            "FAISS asks for; clusters will be small and noisy",
                            cfg.num_examples, cfg.num_clusters)

    # ---------------------------------------------------------------- model_dir
    chief = distribute.is_chief(strategy)
    with run_dir.RunLock(distribute.write_dir(strategy, cfg.model_dir)):
        failpoints.reach("run.locked")
        resume_from = run_dir.claim(cfg, overwrite) if chief else None
        failpoints.reach("run.config_written")
        # A barrier: the other workers restore from MODEL_DIR once the chief has claimed it.
        distribute.from_chief(strategy, 0)
        _train(cfg, source, backbone, cluster_endpoint, labels, strategy, resume_from)


def _train(cfg: config.TrainConfig, source: data.Source, backbone: keras.Model,
           cluster_endpoint: str, labels: Optional[np.ndarray],
           strategy: tf.distribute.Strategy, resume_from: Optional[str]) -> None:
    """The run itself, in a claimed and locked model_dir (a scratch folder on other workers),
    resumed from `resume_from`, the checkpoint the chief's claim chose; the other workers (None)
    take the newest checkpoint that loads in the chief's folder, the same one."""
    chief = distribute.is_chief(strategy)
    distributed = strategy if distribute.is_distributed(strategy) else None
    model_dir = distribute.write_dir(strategy, cfg.model_dir)
    if chief:
        data.write_index_map(source, os.path.join(model_dir, "examples.tsv"))
    logging.debug("configuration:\n%s", cfg.to_json())
    logging.info("%s: %s on %s (%d images, %d channel(s)), %d epochs of batch %d; every setting "
                 "in %s", cfg.model_dir, cfg.method, source.name, source.num_examples,
                 source.channels, cfg.epochs, cfg.batch_size,
                 os.path.join(cfg.model_dir, "config.json"))
    # A GPU machine whose CUDA libraries TensorFlow cannot load trains on the CPU after a single
    # warning (bench/RESULTS.md §9): say where the run goes.
    gpus, faiss_gpus = tf.config.list_physical_devices("GPU"), faiss.get_num_gpus()
    logging.info("devices: %s; FAISS (k-means, PIC's graph) on %s",
                 f"{len(gpus)} GPU(s) visible to TensorFlow" if gpus
                 else "no GPU visible to TensorFlow, training on the CPU",
                 f"{faiss_gpus} GPU(s)" if faiss_gpus else "the CPU")

    # ---------------------------------------------------------------- model and state
    v2 = cfg.method == "deepcluster_v2"
    with distribute.variable_scope(strategy):
        model = build_run_model(cfg, backbone)
        checkpoint = RunCheckpoint(
            model, os.path.join(model_dir, "checkpoints"),
            restore_from="" if chief else os.path.join(cfg.model_dir, "checkpoints"))
        initial_epoch = checkpoint.restore(resume_from)
    chief_epoch = int(distribute.from_chief(strategy, initial_epoch))
    if chief_epoch != initial_epoch:
        raise config.ConfigError(
            f"--model_dir={cfg.model_dir}: the chief resumes after epoch {chief_epoch} but this "
            f"worker found the checkpoint of epoch {initial_epoch}; put --model_dir on storage "
            "that every worker reads")
    # The flag wins over the checkpoint's rate; a schedule is built from the flags anyway.
    if not optim.scheduled(cfg):
        for optimizer in (model.optimizer, getattr(model, "head_optimizer", None)):
            if optimizer is not None:
                optimizer.learning_rate = cfg.learning_rate
    truncate_metrics(os.path.join(model_dir, "metrics.jsonl"), initial_epoch)

    # ---------------------------------------------------------------- pipelines and callbacks
    if v2:
        _train_v2(cfg, source, model, checkpoint, initial_epoch, model_dir, strategy)
        return
    steps_per_epoch = math.ceil(cfg.reassign * cfg.num_examples / cfg.batch_size)
    def training_data(batch_size: int, shard: tuple = (1, 0)) -> tf.data.Dataset:
        # One pipeline feeds batch_size-image batches to each of its replicas: an epoch takes
        # its share of steps_per_epoch * cfg.batch_size images from it.
        batches = steps_per_epoch * cfg.batch_size // (batch_size * shard[0])
        return pipelines.training_dataset(
            source, model.pseudo_labels, model.accept, model.epoch, cfg.image_size,
            cfg.crop_scale, cfg.crop_ratio, batch_size, batches, cfg.seed, shard=shard)
    train_data = (distribute.per_worker_datasets(strategy, training_data, cfg.batch_size)
                  if distributed else training_data(cfg.batch_size))

    if cfg.supervised:
        labeller = FixedLabelsCallback(labels, cfg.num_clusters, model_dir)
    else:
        with distribute.variable_scope(strategy):
            folded = models.FoldedBackbone(backbone)  # BN folded into the convs: faster pass

        @tf.function
        def infer(images):
            return tf.cast(folded.network(images, training=False)[cluster_endpoint], tf.float32)

        order = (np.random.default_rng(cfg.seed).permutation(cfg.num_examples)
                 if source.random_access else None)  # the PCA sample is the head of this order
        labeller = ReclusterCallback(
            infer, folded.refresh,
            lambda: pipelines.feature_dataset(source, cfg.resize_size, cfg.image_size,
                                              feature_batch_size(cfg.batch_size), order),
            Clusterer(cfg.clustering, cfg.num_clusters, cfg.kmeans_iters, cfg.seed,
                      cfg.kmeans_mode),
            cfg.num_examples, cfg.pca_dim, cfg.pca_sample, model_dir, cfg.reassign,
            strategy=distributed,
            check_readable=lambda n: config.check_against_data(cfg, None, readable=n))
        labeller.resume(initial_epoch)
    saver = CheckpointCallback(checkpoint)
    montage = not cfg.supervised and chief
    callbacks = [labeller,
                 *([ClusterMontageCallback(source, model_dir, cfg.seed)] if montage else []),
                 RunLogger(model_dir, labeller, cfg.batch_size, steps_per_epoch),
                 *([ReportCallback(model_dir, source)] if chief else []),
                 saver]

    # ---------------------------------------------------------------- train
    if initial_epoch < cfg.epochs:
        logging.info("training epochs %d..%d, %d steps of %d images each", initial_epoch,
                     cfg.epochs - 1, steps_per_epoch, cfg.batch_size)
        # No steps_per_epoch: with it, Keras would keep one iterator across epochs, and batches
        # drawn before a reclustering would be trained on after it (training_dataset).
        model.fit(train_data, epochs=cfg.epochs, initial_epoch=initial_epoch,
                  callbacks=callbacks, shuffle=False, verbose=_verbosity())
    if not _finished(cfg, source, saver, checkpoint, labeller, model_dir):
        return

    # ---------------------------------------------------------------- final clustering, export
    final = (None if cfg.supervised
             else _final_clustering(cfg, strategy, labeller, source, model_dir))
    _export(cfg, strategy, backbone, cluster_endpoint, final, model_dir, source)


def _verbosity() -> int:
    """Keras's progress bar (with the epoch's time left) on a terminal; otherwise none, and the
    RunLogger's line a minute stands in for it."""
    return 1 if console.interactive() else 0


def _final_clustering(cfg: config.TrainConfig, strategy: tf.distribute.Strategy, labeller,
                      source: data.Source, model_dir: str) -> FinalClustering:
    """The clustering of the trained network: the one a previous run saved, else a new one
    (whose pass over the images lists those that became unreadable after the last epoch's)."""
    final = FinalClustering.load(model_dir, cfg.epochs)
    # Every worker takes part in the labeller's collectives (feature pass, statistics) when the
    # chief clusters anew.
    if not distribute.from_chief(strategy, int(final is not None)):
        final = labeller.cluster_final(cfg.epochs)
        if distribute.is_chief(strategy):
            _list_skipped(source, labeller, model_dir)
    return final


def _list_skipped(source: data.Source, labeller, model_dir: str) -> None:
    """Writes skipped.tsv with the images the labeller's last pass could not read, if any."""
    if len(labeller.skipped):
        data.write_skipped(source, labeller.skipped, os.path.join(model_dir, "skipped.tsv"))
        logging.warning("%d unreadable images were skipped (listed with the reason in "
                        "%s/skipped.tsv), e.g. %s", len(labeller.skipped), model_dir,
                        ", ".join(source.describe(int(i)) for i in labeller.skipped[:5]))


def _export(cfg: config.TrainConfig, strategy: tf.distribute.Strategy, network: keras.Model,
            assign_endpoint: str, final: Optional[FinalClustering], model_dir: str,
            source: data.Source) -> None:
    """The chief exports `network` (its `assign` signature reads `assign_endpoint`), then writes
    the run's report once more, now with the final clustering."""
    if not distribute.is_chief(strategy):
        logging.info("worker done: the chief exports to %s/export", cfg.model_dir)
        return
    path = export_saved_model(network, os.path.join(model_dir, "export"), cfg.image_size,
                              cfg.channels, models.min_image_size(cfg.arch), assign_endpoint,
                              final)
    logging.info("exported %s to %s", ", ".join(sorted(network.output)), path)
    report.write_run_report(model_dir, source)


def _finished(cfg: config.TrainConfig, source: data.Source, saver: CheckpointCallback,
              checkpoint: RunCheckpoint, labeller, model_dir: str) -> bool:
    """After fit(): raises on divergence, says how to continue after SIGTERM (False), lists the
    skipped images; True when the run trained all its epochs, with the labeller ready for the
    final clustering."""
    if saver.diverged_at is not None:
        raise NonFiniteLossError(
            f"the loss became non-finite in epoch {saver.diverged_at}; the checkpoint of the last "
            f"good epoch is intact in {model_dir}/checkpoints. Lower --learning_rate (now "
            f"{cfg.learning_rate}) and re-run the same command to resume from it.")
    if saver.preempted:
        logging.warning("stopped by SIGTERM: the checkpoint after epoch %d is saved; re-run the "
                        "same command to continue", int(checkpoint.epochs_done.numpy()) - 1)
        return False
    _list_skipped(source, labeller, model_dir)
    # fit() gives the callbacks their model, but a re-run with every epoch trained does not
    # call it, and the labeller's final clustering needs the model.
    labeller.set_model(checkpoint.model)
    return True


def _train_v2(cfg: config.TrainConfig, source: data.Source, model: DeepClusterV2Model,
              checkpoint: RunCheckpoint, initial_epoch: int, model_dir: str,
              strategy: tf.distribute.Strategy) -> None:
    """DeepCluster-v2: multi-crop stream, reclustering of the memory bank at every epoch start,
    final assignment to head 0's prototypes, export with the embedding (by the chief)."""
    chief = distribute.is_chief(strategy)
    distributed = strategy if distribute.is_distributed(strategy) else None
    steps_per_epoch = v2_steps_per_epoch(cfg)

    def training_data(batch_size: int, shard: tuple = (1, 0)) -> tf.data.Dataset:
        batches = steps_per_epoch * cfg.batch_size // (batch_size * shard[0])
        return pipelines.multicrop_dataset(
            source, model.epoch, cfg.image_size, cfg.global_crops, cfg.global_crop_scale,
            cfg.local_crops, cfg.local_crop_size, cfg.local_crop_scale, cfg.crop_ratio,
            batch_size, batches, cfg.seed, cfg.color_jitter, cfg.blur, shard=shard)
    train_data = (distribute.per_worker_datasets(strategy, training_data, cfg.batch_size)
                  if distributed else training_data(cfg.batch_size))
    labeller = PrototypeCallback(
        tf.function(lambda images: model(images, training=False)),
        lambda: pipelines.feature_dataset(source, cfg.resize_size, cfg.image_size,
                                          feature_batch_size(cfg.batch_size)),
        cfg.num_prototypes, cfg.kmeans_iters, cfg.seed, model_dir, source.labels,
        strategy=distributed,
        check_readable=lambda n: config.check_against_data(cfg, None, readable=n))
    labeller.resume(initial_epoch)
    saver = CheckpointCallback(checkpoint)
    callbacks = [labeller,
                 *([ClusterMontageCallback(source, model_dir, cfg.seed)] if chief else []),
                 RunLogger(model_dir, labeller, cfg.batch_size, steps_per_epoch),
                 *([ReportCallback(model_dir, source)] if chief else []),
                 saver]
    if initial_epoch < cfg.epochs:
        logging.info("training epochs %d..%d (DeepCluster-v2), %d steps of %d images, %d "
                     "crops each", initial_epoch, cfg.epochs - 1, steps_per_epoch,
                     cfg.batch_size, cfg.global_crops + cfg.local_crops)
        model.fit(train_data, epochs=cfg.epochs, initial_epoch=initial_epoch,
                  callbacks=callbacks, shuffle=False, verbose=_verbosity())
    if not _finished(cfg, source, saver, checkpoint, labeller, model_dir):
        return
    _export(cfg, strategy, model.export_network(), "embedding",
            _final_clustering(cfg, strategy, labeller, source, model_dir), model_dir, source)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    console.quiet_library_info()
    start = time.time()
    try:
        cfg = run(config.validate(train_flags.config_from_flags()), overwrite=flags.FLAGS.overwrite)
    except (config.ConfigError, data.DatasetNotFoundError, NonFiniteLossError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    except tf.errors.InvalidArgumentError as e:  # the data of an epoch ran short
        message = pipelines.short_epoch(e)
        if message is None:
            raise
        logging.error("%s", message)
        sys.exit(f"error: {message}")
    except (OSError, tf.errors.OpError) as e:
        if not _disk_full(e):
            raise
        message = (f"the filesystem of --model_dir={flags.FLAGS.model_dir} is full "
                   f"({' '.join(str(e).split())[:300]}). What was saved before is intact: free "
                   "some space (or move the folder) and re-run the same command to resume.")
        logging.error("%s", message)
        sys.exit(f"error: {message}")
    if os.path.isdir(os.path.join(cfg.model_dir, "export")):
        print(console.closing_block(cfg, time.time() - start))


def _disk_full(error: Exception) -> bool:
    """Whether an error from Python or TensorFlow I/O means that the disk or quota is full."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(words in str(error) for words in ("No space left", "Disk quota exceeded"))


def entry_point():
    """The `dc-tf-train` console script."""
    app.run(main)


if __name__ == "__main__":
    entry_point()
