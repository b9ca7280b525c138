"""Whole-dataset feature extraction for clustering, streamed through PCA-whitening.

The released DeepCluster code keeps an N x 4096 float32 matrix (21 GB on ImageNet). Here the
first `pca_sample` examples of the (random) reading order are kept at full width (one
preallocated buffer) to fit the PCA-whitening; every later batch is projected as soon as it is
computed, so memory is pca_sample x D + N x pca_dim floats plus bounded temporaries
(bench/feature_pass.py measures the peak at ImageNet size).
"""

import dataclasses
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import threadpoolctl
from absl import logging

from dc_core import clustering
from dc_tf import distribute, failpoints

# Rows whitened and normalised at a time when the PCA sample is stored (bounded temporaries).
_STORE_ROWS = 8192


@dataclasses.dataclass
class FeaturePass:
    """Result of one pass over the dataset.

    Attributes:
      features: float32 [N, d] PCA-whitened, L2-normalised rows in example order (zeros where
        the example could not be read).
      present: bool [N], False for examples that failed to decode.
      labels: int64 [N] ground-truth labels seen on the way (-1 unknown).
      pca: the whitening fitted in this pass (None when pca_dim = 0).
      seconds: wall time of the pass.
    """
    features: np.ndarray
    present: np.ndarray
    labels: np.ndarray
    pca: Optional[clustering.PCAWhitening]
    seconds: float

    @property
    def missing(self) -> np.ndarray:
        return np.flatnonzero(~self.present)


def extract_features(infer, dataset: tf.data.Dataset, num_examples: int, pca_dim: int,
                     pca_sample: int, log_every_s: float = 30.0,
                     strategy: Optional[tf.distribute.Strategy] = None,
                     check_readable: Optional[Callable[[int], None]] = None) -> FeaturePass:
    """Runs `infer` over every batch and returns whitened, L2-normalised features by index.

    Args:
      infer: callable float32 [B, S, S, C] -> float32 [B, D] (the network in inference mode).
      dataset: batches of (images, indices, labels), e.g. `pipelines.feature_dataset`.
      num_examples: N.
      pca_dim: whitened dimension d (0 = keep D, no PCA).
      pca_sample: number of leading examples of the stream the PCA is fitted on.
      strategy: shard every batch over this strategy's replicas (None: one device). Every
        worker of a multi-worker strategy must call it, and gets every row.
      check_readable: called with the number of images that decoded, once all are read and
        before a PCA is fitted on fewer than pca_sample of them; raises if the run cannot
        use that few (`config.check_against_data`).
    """
    start = time.time()
    labels = np.full(num_examples, -1, np.int64)
    present = np.zeros(num_examples, bool)
    rows = _Rows(num_examples, pca_dim, min(pca_sample, num_examples) if pca_dim > 0 else 0)
    seen, last_log = 0, start
    batches = (_batches(infer, dataset) if strategy is None
               else _sharded_batches(infer, dataset, strategy))
    # One BLAS thread for the numpy work between batches: OpenBLAS's idle threads spin and take
    # cores from the network (on 2 cores the pass took 10 % longer than the same network's
    # inference alone with them, 4 % without; bench/RESULTS.md §8).
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        for x, idx, lab in batches:
            labels[idx], present[idx] = lab, True
            seen += len(idx)
            failpoints.reach("features.batch")
            rows.add(x, idx)
            if time.time() - last_log > log_every_s:
                last_log = time.time()
                logging.info("features: %d/%d images (%.0f images/s)", seen, num_examples,
                             seen / (last_log - start))
    if check_readable is not None:
        check_readable(int(present.sum()))
    out, pca = rows.finish()
    return FeaturePass(out, present, labels, pca, time.time() - start)


class _Rows:
    """The pass's output as it fills: the PCA sample (the first `target` rows of the stream,
    kept at full width until the PCA is fitted on them), then whitened, L2-normalised rows by
    example index."""

    def __init__(self, num_examples: int, pca_dim: int, target: int):
        self.num_examples, self.pca_dim, self.target = num_examples, pca_dim, target
        self.out, self.pca = None, None
        self.sample, self.sample_idx, self.filled = None, None, 0
        self.blas_threads = max((pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                                 if pool["user_api"] == "blas"), default=1)

    def project(self, x: np.ndarray) -> np.ndarray:
        """Whitened (when fitted), L2-normalised rows; the PCA sample by blocks (bounded
        temporaries), a batch in one go (no copy on the per-batch path)."""
        if len(x) > _STORE_ROWS:
            return np.concatenate([self.project(x[first:first + _STORE_ROWS])
                                   for first in range(0, len(x), _STORE_ROWS)])
        return clustering.l2_normalize(self.pca.apply(x) if self.pca is not None else x)

    def _store(self, z: np.ndarray, idx: np.ndarray) -> None:
        if self.out is None:
            self.out = np.zeros((self.num_examples, z.shape[1]), np.float32)
        self.out[idx] = z

    def _fit_sample(self) -> None:
        # Once per pass and BLAS-bound (a 4096 x 4096 covariance over 50,000 rows): every BLAS
        # thread the process had, even when the sample fills inside the one-thread loop.
        with threadpoolctl.threadpool_limits(limits=self.blas_threads, user_api="blas"):
            self.pca = clustering.fit_pca_whitening(self.sample[:self.filled], self.pca_dim)
            failpoints.reach("pca.fitted")
            z = self.project(self.sample[:self.filled])
        self.sample = None  # freed before the N x pca_dim output exists: never both at once
        self._store(z, self.sample_idx[:self.filled])

    def add(self, x: np.ndarray, idx: np.ndarray) -> None:
        """The features x of the examples idx, next in the stream."""
        if self.filled < self.target:
            if self.sample is None:
                self.sample = np.empty((self.target, x.shape[1]), np.float32)
                self.sample_idx = np.empty(self.target, np.int64)
            take = min(self.target - self.filled, len(idx))
            self.sample[self.filled:self.filled + take] = x[:take]
            self.sample_idx[self.filled:self.filled + take] = idx[:take]
            self.filled += take
            if self.filled == self.target:
                self._fit_sample()
            x, idx = x[take:], idx[take:]
        if len(idx):
            self._store(self.project(x), idx)

    def finish(self) -> tuple:
        """(float32 [N, d] rows, the PCA or None) once the stream has ended."""
        if self.sample is not None:  # unreadable examples left the stream shorter than the sample
            self._fit_sample()
        if self.out is None:
            raise RuntimeError("the feature pass read no image at all: every example failed to "
                               "decode")
        return self.out, self.pca


def _batches(infer, dataset: tf.data.Dataset):
    for images, idx, lab in dataset:
        yield infer(images).numpy(), idx.numpy(), lab.numpy()


def _sharded_batches(infer, dataset: tf.data.Dataset, strategy: tf.distribute.Strategy):
    """(features, indices, labels) of every batch, each replica computing its share of it.

    Each global batch is split over the replicas in order, and the rows are gathered back in
    replica order: every worker sees the single-device stream, so the PCA sample is the same.
    A replica left without data at the end (uneven shards) contributes an empty batch.
    """
    distributed = strategy.experimental_distribute_dataset(distribute.shard_by_data(dataset))

    @tf.function
    def step(batch):
        images, idx, lab = batch
        x = strategy.run(infer, args=(images,))
        return tuple(strategy.gather(v, axis=0) for v in (x, idx, lab))

    for batch in distributed:
        yield tuple(v.numpy() for v in step(batch))
