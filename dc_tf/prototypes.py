"""PrototypeCallback: DeepCluster-v2's reclustering of the memory bank (docs/protocols.md §9).

At the start of every epoch, for every prototype head h, spherical k-means of bank slot h mod 2
(with a fresh seed per head and epoch) gives the head's new prototypes and every example's
cluster. The clustering runs in numpy through one `tf.numpy_function` op for all heads, and
reaches training through variables only: the prototypes and the assignments of the
DeepClusterV2Model. Before the first epoch the bank is filled by one pass of the initial network
over centre crops; after it, train_step writes the bank.

Under tf.distribute every worker holds the whole bank (train_step gathers it), clusters it with
the same seeds, and then takes the chief's prototypes and assignments, so that no worker can
drift from the chief's clustering.
"""

import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dc_core import clustering
from dc_tf import distribute
from dc_tf.console import figure
from dc_tf.features import extract_features
from dc_tf.recluster import FinalClustering, empty_stats, save_final
from dc_tf.run_dir import RunDir


class PrototypeCallback(keras.callbacks.Callback):
    """Reclusters the memory bank at the start of every epoch and saves head 0's assignment.

    Args:
      embed: float32 images -> float32 [B, d] unit embeddings (the model in inference mode).
      feature_data: callable returning the centre-crop dataset (batches of images, indices,
        labels) for the bank's first filling and the final clustering.
      num_prototypes: k of each head.
      kmeans_iters: spherical k-means iterations (DeepCluster-v2: 10).
      seed: the run's seed; head h of epoch t clusters with a seed drawn from (seed, t, h).
      model_dir: the run folder whose epoch assignments (head 0) it writes.
      ground_truth: int [N] labels for nmi_labels (-1 unknown), or None.
      strategy: the tf.distribute strategy the model lives in (None: one device).
      check_readable: as in `extract_features`, for the bank's first filling and the final
        embedding pass.
    After `on_epoch_begin`, `stats` holds the epoch's figures for the run logger: those of
    DeepCluster for head 0, and kmeans_loss_headH, empty_clusters_headH, nmi_labels_headH for
    every head.
    """

    def __init__(self, embed: Callable, feature_data: Callable[[], tf.data.Dataset],
                 num_prototypes: tuple, kmeans_iters: int, seed: int, model_dir: str,
                 ground_truth: Optional[np.ndarray],
                 strategy: Optional[tf.distribute.Strategy] = None,
                 check_readable: Optional[Callable[[int], None]] = None):
        super().__init__()
        self.strategy = strategy
        self.embed, self.feature_data = embed, feature_data
        self.num_prototypes, self.iters, self.seed = tuple(num_prototypes), kmeans_iters, seed
        self.run = RunDir(model_dir)
        self.ground_truth = (ground_truth if ground_truth is not None
                             and (ground_truth >= 0).any() else None)
        self.previous: Optional[np.ndarray] = None
        self.stats: dict = {}
        self.skipped: np.ndarray = np.zeros(0, np.int64)
        self.check_readable = check_readable

    def resume(self, epoch: int) -> None:
        """Picks up the assignment the run had before `epoch` (for nmi_prev after a restart)."""
        self.previous = self.run.previous_assignment(epoch)

    def _embedding_pass(self, what):
        logging.info("%s: embedding pass over %d images", what, self.model.bank.shape[0])
        return extract_features(self.embed, self.feature_data(), self.model.bank.shape[0],
                                pca_dim=0, pca_sample=0, check_readable=self.check_readable)

    def on_epoch_begin(self, epoch, logs=None):
        self.stats = empty_stats()
        if epoch == 0:  # a run starting afresh: the bank holds nothing yet
            fp = self._embedding_pass("epoch 0")
            self.model.bank.assign(np.stack([fp.features, fp.features], axis=1))
            self.skipped = fp.missing
            if self.ground_truth is None and (fp.labels >= 0).any():  # a record source's
                self.ground_truth = fp.labels
            self.stats["time_features_s"] = fp.seconds
        start = time.time()
        # A tensor epoch: a Python int would retrace the function every epoch.
        losses, empty = self._recluster(tf.constant(epoch, tf.int64))
        # One worker's assignment of mirrored copies reaches all of its replicas; other workers
        # clustered on their own and take the chief's result.
        if self.strategy is not None and distribute.is_multi_worker(self.strategy):
            distribute.sync_from_chief(self.strategy,
                                       [self.model.assignments, *self.model.prototypes])
        self.model.epoch.assign(epoch)  # the multi-crop stream of this epoch
        assignments = self.model.assignments.numpy()
        labels = assignments[0]
        for head, (loss, count) in enumerate(zip(losses.numpy(), empty.numpy())):
            self.stats[f"kmeans_loss_head{head}"] = float(loss)
            self.stats[f"empty_clusters_head{head}"] = int(count)
            if self.ground_truth is not None:
                self.stats[f"nmi_labels_head{head}"] = clustering.nmi(assignments[head],
                                                                      self.ground_truth)
        self.stats.update(
            kmeans_loss=self.stats["kmeans_loss_head0"],
            empty_clusters=self.stats["empty_clusters_head0"],
            nmi_labels=self.stats.get("nmi_labels_head0"),
            nmi_prev=(clustering.nmi(labels, self.previous)
                      if self.previous is not None else None),
            time_cluster_s=time.time() - start,
            cluster_sizes=clustering.cluster_sizes(labels, self.num_prototypes[0]))
        logging.info("epoch %d: spherical k-means of the bank into %s prototypes in %.1fs, "
                     "nmi_prev %s, nmi_labels %s", epoch, self.num_prototypes,
                     self.stats["time_cluster_s"], figure(self.stats["nmi_prev"]),
                     figure(self.stats["nmi_labels"]))
        self.run.save_assignment(epoch, labels)
        self.previous = labels

    def cluster(self, bank: np.ndarray, epoch: np.ndarray):
        """numpy: bank float32 [N, 2, d] -> (int32 [P, N] assignments, float32 [d, sum k]
        prototypes of every head side by side, float32 [P] losses, int32 [P] empty clusters).

        Rows never embedded (all zeros: unreadable images) get no cluster (-1).
        """
        present = np.linalg.norm(bank[:, 0], axis=1) > 0
        assignments = np.full((len(self.num_prototypes), len(bank)), -1, np.int32)
        centroids, losses, empty = [], [], []
        for head, k in enumerate(self.num_prototypes):
            seed = int(np.random.SeedSequence([self.seed, int(epoch), head]).generate_state(1)[0])
            result = clustering.spherical_kmeans(bank[present, head % 2], k, seed, self.iters)
            assignments[head, present] = result.labels
            centroids.append(result.centroids.T)
            losses.append(result.loss)
            empty.append(result.empty_clusters)
        return (assignments, np.concatenate(centroids, axis=1).astype(np.float32),
                np.array(losses, np.float32), np.array(empty, np.int32))

    @tf.function
    def _recluster(self, epoch):
        # The one TF <-> numpy crossing of a reclustering.
        assignments, centroids, losses, empty = tf.numpy_function(
            self.cluster, [self.model.bank, epoch], [tf.int32, tf.float32, tf.float32, tf.int32],
            stateful=True)
        self.model.assignments.assign(tf.ensure_shape(assignments,
                                                      self.model.assignments.shape))
        start = 0
        for prototypes, k in zip(self.model.prototypes, self.num_prototypes):
            prototypes.assign(tf.ensure_shape(centroids[:, start:start + k], prototypes.shape))
            start += k
        return losses, empty

    def cluster_final(self, epochs: int) -> FinalClustering:
        """Puts every training image, embedded by the trained network (centre crop), into its
        head-0 prototype of largest dot product, as the export's `assign` does; saves it with its
        figures as the run's final clustering."""
        if self.strategy is not None:  # the chief's BN statistics, as the export has them
            distribute.sync_from_chief(self.strategy,
                                       self.model.backbone.non_trainable_variables
                                       + self.model.projection.non_trainable_variables)
        fp = self._embedding_pass("final")
        if len(fp.missing):  # images that vanished since the bank's first filling too
            self.skipped = fp.missing
        start = time.time()
        prototypes = self.model.prototypes[0].numpy()  # [d, k]
        scores = fp.features @ prototypes
        labels = np.where(fp.present, np.argmax(scores, axis=1), -1).astype(np.int32)
        similarity = scores[np.arange(len(labels)), np.maximum(labels, 0)][fp.present]
        dim = prototypes.shape[0]
        final = FinalClustering(labels, np.zeros(dim, np.float32), np.eye(dim, dtype=np.float32),
                                np.ascontiguousarray(prototypes.T), epochs)
        found = np.unique(labels[labels >= 0])
        figures = {"epochs": epochs,
                   "kmeans_loss": float(np.sum(2.0 - 2.0 * similarity.astype(np.float64))),
                   "empty_clusters": int(self.num_prototypes[0] - len(found)),
                   "time_features_s": fp.seconds, "time_cluster_s": time.time() - start,
                   "nmi_prev": (clustering.nmi(labels, self.previous)
                                if self.previous is not None else None),
                   "nmi_labels": (clustering.nmi(labels, self.ground_truth)
                                  if self.ground_truth is not None else None)}
        save_final(self.run, final, figures)
        return final
