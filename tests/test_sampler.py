"""The balanced sampler: uniform over non-empty clusters, and it decodes only what it accepts."""

import dataclasses

import numpy as np
import tensorflow as tf
from scipy import stats

from dc_tf.clustering import acceptance_probabilities
from dc_tf.data import pipelines, sampler
from dc_tf.data.sources import ArraySource


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
    ds = sampler.accepted_pairs(source, labels_var, accept_var, seed=3)
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


def test_training_pipeline_reads_new_labels_without_rebuilding():
    n = 64
    source = _source(n)
    labels_var = tf.Variable(np.zeros(n, np.int32))
    accept_var = tf.Variable(np.ones(2, np.float32))
    ds = pipelines.training_dataset(source, labels_var, accept_var, image_size=2,
                                    crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.33), batch_size=8,
                                    seed=0)
    images, indices = next(iter(ds))
    assert images.shape == (8, 2, 2, 1) and images.dtype == tf.float32
    assert indices.dtype == tf.int32
    # Exclude the first half: the same pipeline then only yields the second half.
    labels_var.assign(np.where(np.arange(n) < n // 2, -1, 1).astype(np.int32))
    seen = np.concatenate([ix.numpy() for _, ix in ds.skip(20).take(10)])
    assert (seen >= n // 2).all()
