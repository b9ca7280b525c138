"""ReclusterCallback: the glue between `fit()` and the clustering.

Every `reassign` epochs, before the epoch's first step, it runs the feature pass, clusters the
features in numpy through one `tf.numpy_function` op, and hands the result to training through
variables only: the pseudo-labels, the sampler's acceptance probabilities, and a re-initialised
top layer with a fresh optimizer state.
"""

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dc_core import clustering, fileio
from dc_tf import distribute, failpoints
from dc_tf.console import figure
from dc_tf.features import FeaturePass, extract_features
from dc_tf.run_dir import RunDir


@dataclasses.dataclass(frozen=True)
class Clustering:
    """One clustering of the clustered examples' features.

    Attributes:
      pseudo_labels: int32 [n] cluster of every clustered example (of all N, -1 for the examples
        without features, once `Clusterer.cluster_all` has placed them).
      centroids: float32 [c, d] in the clustered space.
      loss: the k-means loss (nan: PIC has none).
      empty_clusters: clusters of the k that hold no example.
    """
    pseudo_labels: np.ndarray
    centroids: np.ndarray
    loss: float
    empty_clusters: int


class Clusterer:
    """numpy in, numpy out: the clustering of features (k-means or PIC).

    Args:
      method: "kmeans" or "pic".
      num_clusters: k (for PIC, the most clusters the top layer can hold).
      kmeans_iters: k-means iterations.
      seed: base seed; reclustering t uses seed + t, so every epoch has a fresh k-means init.
      kmeans_mode: "exact", "two_level" or "shortlist" (`clustering.kmeans`).
    """

    def __init__(self, method: str, num_clusters: int, kmeans_iters: int, seed: int,
                 kmeans_mode: str = "exact"):
        self.method, self.k, self.iters, self.seed = method, num_clusters, kmeans_iters, seed
        self.mode = kmeans_mode

    def cluster(self, x: np.ndarray, epoch: int) -> Clustering:
        """Clusters the rows of x. PIC has no centroids of its own: they are the means of its
        clusters' members."""
        failpoints.reach("kmeans.started")
        if self.method == "kmeans":
            result = clustering.kmeans(x, self.k, seed=int(self.seed + epoch), niter=self.iters,
                                       verbose=len(x) >= 100_000,  # FAISS logs each iteration
                                       mode=self.mode)
            failpoints.reach("kmeans.done")
            return Clustering(result.labels, result.centroids, result.loss,
                              result.empty_clusters)
        labels = clustering.pic(x, max_clusters=self.k)
        found = int(labels.max()) + 1
        centroids = np.zeros((found, x.shape[1]), np.float64)
        np.add.at(centroids, labels, x)
        centroids /= np.bincount(labels, minlength=found)[:, None]
        return Clustering(labels, centroids.astype(np.float32), float("nan"), self.k - found)

    def cluster_all(self, features: np.ndarray, present: np.ndarray, epoch: int) -> Clustering:
        """Clusters the rows of `features` that are `present`; the others get no cluster."""
        found = self.cluster(features[present], epoch)
        labels = np.full(len(features), -1, np.int32)
        labels[present] = found.pseudo_labels
        return dataclasses.replace(found, pseudo_labels=labels)

    def __call__(self, features: np.ndarray, present: np.ndarray, epoch: np.ndarray):
        """The numpy side of ReclusterCallback's one tf.numpy_function: (pseudo-labels,
        acceptance probabilities, loss, empty clusters) as the op's four outputs."""
        found = self.cluster_all(features, present, int(epoch))
        accept = clustering.acceptance_probabilities(found.pseudo_labels, self.k)
        return (found.pseudo_labels, accept.astype(np.float32), np.float32(found.loss),
                np.int32(found.empty_clusters))


@dataclasses.dataclass
class FinalClustering:
    """The clustering of the final weights, which the export carries for its `assign` signature.

    The clusters of epoch t were found with the weights of the start of epoch t, so they do not
    fit the trained network; this one is computed after the last epoch.

    Attributes:
      labels: int32 [N] cluster of every example (-1: unreadable).
      mean: float32 [D], matrix: float32 [D, d]: the PCA-whitening (identity when pca_dim = 0).
      centroids: float32 [c, d] in the whitened, L2-normalised space.
      epochs: the number of trained epochs it belongs to.
    """
    labels: np.ndarray
    mean: np.ndarray
    matrix: np.ndarray
    centroids: np.ndarray
    epochs: int

    def save(self, run: RunDir) -> None:
        run.save_assignment("final", self.labels)
        with fileio.atomic_open(run.final_arrays, "wb") as f:
            np.savez(f, **dataclasses.asdict(self))

    @classmethod
    def load(cls, run: RunDir, epochs: int) -> Optional["FinalClustering"]:
        """The saved final clustering if it belongs to a run of `epochs` epochs, else None."""
        path = run.final_arrays
        if not os.path.exists(path):
            return None
        with np.load(path) as f:
            saved = cls(**{k: f[k] for k in f.files})
        return saved if int(saved.epochs) == epochs else None


def save_final(run: RunDir, final: FinalClustering, figures: dict) -> None:
    """Writes the final clustering and its figures."""
    # The figures first: a saved final clustering is reused on a re-run, so it must never
    # exist without its figures.
    fileio.atomic_write(run.final_figures, json.dumps(figures, indent=1))
    final.save(run)
    failpoints.reach("final.saved")
    logging.info("final clustering: %s", ", ".join(f"{key} {figure(value)}"
                                                    for key, value in figures.items()))


def empty_stats() -> dict:
    return {"kmeans_loss": None, "nmi_prev": None, "nmi_labels": None, "empty_clusters": None,
            "time_features_s": 0.0, "time_cluster_s": 0.0}


class FixedLabelsCallback(keras.callbacks.Callback):
    """The Supervised baseline: the ground-truth labels as fixed targets, sampled uniformly over
    classes like clusters, with one top layer for the whole run. Same interface as
    ReclusterCallback for the run logger (`stats`, `skipped`)."""

    def __init__(self, labels: np.ndarray, num_classes: int, model_dir: str):
        super().__init__()
        self.labels = labels.astype(np.int32)
        self.num_classes, self.run = num_classes, RunDir(model_dir)
        self.stats = empty_stats()
        self.skipped = np.zeros(0, np.int64)

    def on_train_begin(self, logs=None):
        self.model.pseudo_labels.assign(self.labels)
        self.model.accept.assign(clustering.acceptance_probabilities(self.labels,
                                                                     self.num_classes))

    def on_epoch_begin(self, epoch, logs=None):
        self.model.epoch.assign(epoch)
        self.run.save_assignment(epoch, self.labels)


class ReclusterCallback(keras.callbacks.Callback):
    """Reclusters at the start of every `reassign`-th epoch and saves each epoch's assignment.

    Args:
      infer: float32 images -> float32 [B, D] clustering features (network in inference mode).
      refresh_infer: brings `infer`'s network up to date with the trained backbone; called
        before every feature pass (models.FoldedBackbone.refresh, which refolds BN).
      feature_data: callable returning the feature-pass dataset (batches of images, indices,
        labels); called at each reclustering.
      clusterer: the numpy clustering.
      num_examples, pca_dim, pca_sample: as in `extract_features`.
      model_dir: the run folder whose epoch assignments it writes (a non-chief worker's scratch
        folder).
      reassign: epochs between reclusterings.
      strategy: the tf.distribute strategy the model lives in (None: one device). The feature
        pass is sharded over its replicas; only the chief clusters, and every worker assigns the
        chief's pseudo-labels and acceptance probabilities.
      check_readable: as in `extract_features`; every feature pass checks how many images
        decoded (files can vanish between epochs).
    After `on_epoch_begin`, `stats` holds the epoch's clustering figures for the run logger.
    """

    def __init__(self, infer: Callable, refresh_infer: Callable[[], None],
                 feature_data: Callable[[], tf.data.Dataset],
                 clusterer: Clusterer, num_examples: int, pca_dim: int, pca_sample: int,
                 model_dir: str, reassign: int,
                 strategy: Optional[tf.distribute.Strategy] = None,
                 check_readable: Optional[Callable[[int], None]] = None):
        super().__init__()
        self.infer, self.refresh_infer = infer, refresh_infer
        self.feature_data, self.clusterer = feature_data, clusterer
        self.num_examples, self.pca_dim, self.pca_sample = num_examples, pca_dim, pca_sample
        self.run, self.reassign = RunDir(model_dir), reassign
        self.strategy, self.check_readable = strategy, check_readable
        self.chief = strategy is None or distribute.is_chief(strategy)
        self.ground_truth: Optional[np.ndarray] = None  # labels, learnt in the feature pass
        self.previous: Optional[np.ndarray] = None
        self.stats: dict = {}
        self.skipped: np.ndarray = np.zeros(0, np.int64)

    def resume(self, epoch: int) -> None:
        """Picks up the assignment the run had before `epoch` (for nmi_prev after a restart)."""
        self.previous = self.run.previous_assignment(epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self.stats = empty_stats()
        recluster = epoch % self.reassign == 0 or self.previous is None
        if self.strategy is not None:  # the feature pass is collective: the chief decides
            recluster = bool(distribute.from_chief(self.strategy, int(recluster)))
        if recluster:
            self._recluster(epoch)
        self.model.epoch.assign(epoch)  # the sampler's stream of this epoch
        assignment = self.model.pseudo_labels.numpy()
        self.run.save_assignment(epoch, assignment)
        failpoints.reach("assignment.saved")
        self.previous = assignment

    def _feature_pass(self, epoch) -> FeaturePass:
        logging.info("epoch %s: feature pass over %d images", epoch, self.num_examples)
        if self.strategy is not None:  # every replica computes features with the chief's network
            distribute.sync_from_chief(self.strategy, self.model.backbone.non_trainable_variables)
        self.refresh_infer()
        fp = extract_features(self.infer, self.feature_data(), self.num_examples, self.pca_dim,
                              self.pca_sample, strategy=self.strategy,
                              check_readable=self.check_readable)
        if len(fp.missing):  # images that vanished since the previous pass too
            self.skipped = fp.missing
        self.ground_truth = fp.labels if (fp.labels >= 0).any() else None
        return fp

    def cluster_final(self, epochs: int) -> Optional[FinalClustering]:
        """Clusters the features of the trained network once more (after the last epoch), and
        saves it with its figures as the run's final clustering.

        A non-chief worker takes part in the (collective) feature pass only and returns None.
        """
        fp = self._feature_pass("final")
        if not self.chief:
            return None
        start = time.time()
        found = self.clusterer.cluster_all(fp.features, fp.present, epochs)
        dim = fp.features.shape[1]
        pca = fp.pca or clustering.PCAWhitening(np.zeros(dim, np.float32),
                                                np.eye(dim, dtype=np.float32))
        final = FinalClustering(found.pseudo_labels, pca.mean, pca.matrix, found.centroids,
                                epochs)
        figures = {"epochs": epochs, **self._figures(found.pseudo_labels, found.loss,
                                                     found.empty_clusters, fp, start)}
        save_final(self.run, final, figures)
        return final

    def _recluster(self, epoch: int) -> None:
        fp = self._feature_pass(epoch)
        logging.info("epoch %d: %s of %d x %d features into k=%d%s", epoch,
                     self.clusterer.method, int(fp.present.sum()), fp.features.shape[1],
                     self.clusterer.k, "" if self.chief else ", on the chief")
        start = time.time()
        # A tensor epoch: a Python int would retrace the function every epoch.
        loss, empty = self._assign(fp.features, fp.present, tf.constant(epoch, tf.int64))
        self.model.reset_head()
        pseudo_labels = self.model.pseudo_labels.numpy()
        self.stats.update(self._figures(pseudo_labels, float(loss), int(empty), fp, start),
                          cluster_sizes=clustering.cluster_sizes(pseudo_labels, self.clusterer.k))
        logging.info("epoch %d: clustered in %.1fs, loss %.4f, %d empty clusters, nmi_prev %s, "
                     "nmi_labels %s", epoch, self.stats["time_cluster_s"], loss, empty,
                     figure(self.stats["nmi_prev"]), figure(self.stats["nmi_labels"]))

    def _figures(self, pseudo_labels: np.ndarray, loss: float, empty: int, fp: FeaturePass,
                 start: float) -> dict:
        """The figures of a clustering (every epoch's and the final one): its loss, empty
        clusters, NMI with the previous clustering and with the ground truth, and the time of
        the feature pass and of the clustering (since `start`)."""
        return {"kmeans_loss": None if np.isnan(loss) else float(loss),
                "empty_clusters": int(empty), "time_features_s": fp.seconds,
                "time_cluster_s": time.time() - start,
                "nmi_prev": (clustering.nmi(pseudo_labels, self.previous)
                             if self.previous is not None else None),
                "nmi_labels": (clustering.nmi(pseudo_labels, self.ground_truth)
                               if self.ground_truth is not None else None)}

    @tf.function
    def _assign(self, features, present, epoch):
        if self.chief:
            # The one TF <-> numpy crossing of a reclustering.
            labels, accept, loss, empty = tf.numpy_function(
                self.clusterer, [features, present, epoch],
                [tf.int32, tf.float32, tf.float32, tf.int32], stateful=True)
            labels.set_shape(self.model.pseudo_labels.shape)
            accept.set_shape(self.model.accept.shape)
        else:  # replaced by the chief's clustering below
            labels = tf.zeros_like(self.model.pseudo_labels)
            accept, loss, empty = tf.zeros_like(self.model.accept), 0.0, 0
        if self.strategy is not None:
            labels, accept, loss, empty = distribute.from_chief(
                self.strategy, (labels, accept, loss, empty))
        self.model.pseudo_labels.assign(labels)
        self.model.accept.assign(accept)
        return loss, empty
