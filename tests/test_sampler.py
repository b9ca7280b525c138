"""The balanced sampler: uniform over non-empty clusters, and it decodes only what it accepts."""

import dataclasses
import os

import keras
import numpy as np
import tensorflow as tf
from scipy import stats

from dc_core.clustering import acceptance_probabilities
from dc_core.sources import ArraySource
from dc_tf.data import pipelines, sampler
from dc_tf.model import DeepClusterModel
from dc_tf.recluster import Clusterer, Clustering, ReclusterCallback


@dataclasses.dataclass
class CountingSource(ArraySource):
    """An in-memory source that counts how many images it decodes."""

    def __post_init__(self):
        super().__post_init__()
        self.decoded = tf.Variable(0, dtype=tf.int64)

    def decode(self, index, payload):
        with tf.control_dependencies([self.decoded.assign_add(1)]):
            return super().decode(index, payload)


def _skewed(k=10, n=5000, seed=0):
    """Cluster sizes from 2000 down to 1, one empty cluster."""
    sizes = np.array([2000, 1200, 800, 500, 300, 150, 40, 9, 1, 0])[:k]
    labels = np.repeat(np.arange(k), sizes).astype(np.int32)
    labels = np.concatenate([labels, np.full(n - len(labels), -1, np.int32)])  # unreadable
    return np.random.default_rng(seed).permutation(labels), sizes


def _source(n):
    images = np.zeros((n, 2, 2, 1), np.uint8)
    return CountingSource("test", n, 1, None, images=images)


def test_accepted_stream_is_uniform_over_nonempty_clusters():
    labels, sizes = _skewed()
    k, n = len(sizes), len(labels)
    labels_var = tf.Variable(labels)
    accept_var = tf.Variable(acceptance_probabilities(labels, k))
    source = _source(n)
    draws = 9000
    ds = sampler.accepted_pairs(source, labels_var, accept_var, sampler.stream_key(3, epoch=0))
    ds = ds.map(lambda i, p: (i, source.decode(i, p))).take(draws)
    picked = np.array([int(i) for i, _ in ds.as_numpy_iterator()])
    assert len(picked) == draws
    # Only accepted examples were decoded, though most proposals were rejected.
    assert int(source.decoded.numpy()) == draws
    clusters = labels[picked]
    assert (clusters >= 0).all(), "an unreadable (-1) example was sampled"
    counts = np.bincount(clusters, minlength=k)
    assert counts[sizes == 0].sum() == 0
    nonempty = counts[sizes > 0]
    assert stats.chisquare(nonempty).pvalue > 1e-3, nonempty
    # Without balancing the largest cluster would take 40% of the draws; here about 1/9.
    assert nonempty.max() / draws < 0.15


def _training_dataset(source, labels_var, accept_var, epoch_var, steps, batch_size=8, seed=0):
    return pipelines.training_dataset(source, labels_var, accept_var, epoch_var, image_size=2,
                                      crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33),
                                      batch_size=batch_size, steps=steps, seed=seed)


def test_training_pipeline_reads_new_labels_without_rebuilding():
    n = 64
    source = _source(n)
    labels_var = tf.Variable(np.zeros(n, np.int32))
    accept_var = tf.Variable(np.ones(2, np.float32))
    epoch_var = tf.Variable(0, dtype=tf.int64)
    ds = _training_dataset(source, labels_var, accept_var, epoch_var, steps=30)
    assert ds.cardinality() == 30  # Keras starts a new iterator per epoch of a known length
    images, indices = next(iter(ds))
    assert images.shape == (8, 2, 2, 1) and images.dtype == tf.float32
    assert indices.dtype == tf.int32
    # Exclude the first half: the same pipeline's next iterator then only yields the second half.
    labels_var.assign(np.where(np.arange(n) < n // 2, -1, 1).astype(np.int32))
    seen = np.concatenate([ix.numpy() for _, ix in ds])
    assert len(seen) == 30 * 8 and (seen >= n // 2).all()


def test_a_new_clustering_rules_the_next_epoch_from_its_first_batch():
    """The stale-sampler check: 512 examples in 10 clusters; two batches of an epoch, then the
    acceptance of clusters 0-4 drops to zero for the next epoch. Before the fix, 51 % of the
    following 40 batches still came from clusters 0-4 (blocks of 65,536 proposals filtered with
    the old probabilities, prefetched); now none may."""
    n, k = 512, 10
    labels = np.arange(n, dtype=np.int32) % k
    source = _source(n)
    labels_var, epoch_var = tf.Variable(labels), tf.Variable(0, dtype=tf.int64)
    accept_var = tf.Variable(np.ones(k, np.float32))
    ds = _training_dataset(source, labels_var, accept_var, epoch_var, steps=40, batch_size=32)
    first = iter(ds)
    early = np.concatenate([next(first)[1].numpy() for _ in range(2)])
    assert (labels[early] < 5).any()
    accept_var.assign(np.where(np.arange(k) < 5, 0.0, 1.0).astype(np.float32))  # the callback's
    epoch_var.assign(1)                                                          # on_epoch_begin
    later = np.concatenate([ix.numpy() for _, ix in ds])  # the next epoch's iterator, as Keras
    assert len(later) == 40 * 32
    assert (labels[later] < 5).mean() == 0.0


def test_one_seed_gives_one_stream_and_each_epoch_its_own():
    n = 300
    source = ArraySource("test", n, 1, None, images=np.random.default_rng(0).integers(
        0, 255, (n, 6, 6, 1), dtype=np.uint8))
    labels = np.random.default_rng(1).integers(0, 5, n).astype(np.int32)

    def epoch_stream(seed, epoch):
        epoch_var = tf.Variable(epoch, dtype=tf.int64)
        ds = pipelines.training_dataset(
            source, tf.Variable(labels), tf.Variable(acceptance_probabilities(labels, 5)),
            epoch_var, image_size=4, crop_scale=(0.3, 1.0), crop_ratio=(0.75, 1.33),
            batch_size=10, steps=6, seed=seed)
        batches = list(ds.as_numpy_iterator())
        return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))

    views, indices = epoch_stream(seed=7, epoch=2)
    again_views, again_indices = epoch_stream(seed=7, epoch=2)
    np.testing.assert_array_equal(indices, again_indices)
    np.testing.assert_array_equal(views, again_views)  # the crops and flips too
    for seed, epoch in ((7, 3), (8, 2)):
        assert not np.array_equal(epoch_stream(seed, epoch)[1], indices), (seed, epoch)


# ------------------------------------------------------------------------- a real fit()

class _PlannedClusterer(Clusterer):
    """Hands out a planned, skewed clustering per epoch instead of clustering the features."""

    def __init__(self, plans, num_clusters):
        super().__init__("kmeans", num_clusters, 1, 0)
        self.plans = plans

    def cluster(self, x, epoch):
        labels = self.plans[epoch][:len(x)]
        return Clustering(labels, np.zeros((self.k, x.shape[1]), np.float32), 0.0, 0)


class _RecordingModel(DeepClusterModel):
    """DeepClusterModel whose (eager) train_step notes the example indices it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained_on = {}

    def train_step(self, data):
        self.trained_on.setdefault(int(self.epoch.numpy()), []).append(data[1].numpy())
        return super().train_step(data)


def _fit_on_planned_clusterings(model_dir, stale: bool, epochs=4, n=480, batch=16, k=6):
    """Trains `epochs` epochs with the real ReclusterCallback on skewed clusterings (sizes 8:4:2:1
    ... over a different permutation each epoch; one cluster empty); returns per epoch the
    clusters of the indices trained on, in that epoch's assignment. `stale` rebuilds the old
    behaviour: one endless iterator across epochs (steps_per_epoch given to fit)."""
    from dc_tf import models
    from dc_tf.data import pipelines as pl

    rng = np.random.default_rng(0)
    sizes = np.array([240, 120, 60, 40, 20, 0])
    plans = np.stack([rng.permutation(np.repeat(np.arange(k), sizes)).astype(np.int32)
                      for _ in range(epochs)])
    images = rng.integers(0, 255, (n, 8, 8, 1), dtype=np.uint8)
    source = ArraySource("planned", n, 1, None, images=images)
    backbone = models.build_backbone("small_vgg", 8, 1, False, (0.5,), (0.25,), seed=0)
    model = _RecordingModel(backbone, "fc7", n, k, 1e-5, seed=0)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), keras.optimizers.SGD(0.01),
                  run_eagerly=True)
    steps = n // batch
    infer = tf.function(lambda x: backbone(x, training=False)["fc7_pre_relu"])
    callback = ReclusterCallback(
        infer, lambda: None, lambda: pl.feature_dataset(source, 8, 8, 64),
        _PlannedClusterer(plans, k), n, pca_dim=0, pca_sample=n, model_dir=str(model_dir),
        reassign=1)
    ds = pl.training_dataset(source, model.pseudo_labels, model.accept, model.epoch, 8,
                             (0.5, 1.0), (0.75, 1.33), batch, steps=10**6 if stale else steps,
                             seed=0)
    model.fit(ds, epochs=epochs, steps_per_epoch=steps if stale else None,
              callbacks=[callback], shuffle=False, verbose=0)
    clusters = []
    for epoch in range(epochs):
        assignment = np.load(os.path.join(model_dir, "assignments", f"epoch_{epoch:04d}.npy"))
        np.testing.assert_array_equal(assignment, plans[epoch])  # what train_step looked up
        clusters.append(assignment[np.concatenate(model.trained_on[epoch])])
    return clusters, sizes


def _uniformity_pvalues(clusters, sizes):
    """Per epoch, the chi-square p-value of uniform draws over the non-empty clusters."""
    pvalues = []
    for trained in clusters:
        counts = np.bincount(trained, minlength=len(sizes))
        assert counts[sizes == 0].sum() == 0, counts  # never an example of an empty cluster
        pvalues.append(stats.chisquare(counts[sizes > 0]).pvalue)
    return pvalues


def test_fit_samples_uniformly_over_each_epochs_clusters(tmp_path):
    clusters, sizes = _fit_on_planned_clusterings(tmp_path / "run", stale=False)
    pvalues = _uniformity_pvalues(clusters, sizes)
    assert min(pvalues) > 1e-3, pvalues


def test_the_uniformity_check_fails_for_one_iterator_across_reclusterings(tmp_path):
    """The same check on the behaviour before the fix: one iterator for the whole run, whose
    blocks of proposals were filtered with the first clustering's probabilities."""
    clusters, sizes = _fit_on_planned_clusterings(tmp_path / "run", stale=True)
    pvalues = _uniformity_pvalues(clusters, sizes)
    assert pvalues[0] > 1e-3  # the first clustering's own epoch is balanced
    assert max(pvalues[1:]) < 1e-6, pvalues
