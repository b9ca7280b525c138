"""The two tf.data pipelines of a run: the ordered feature pass and the balanced training stream."""

from typing import Optional

import numpy as np
import tensorflow as tf

from dc_tf.data import sampler, transforms
from dc_tf.data.sources import Source

AUTOTUNE = tf.data.AUTOTUNE


# tf.data's autotuner off for the feature pass: its map then runs one call per core (tf.data's
# default for AUTOTUNE without the autotuner) and prefetch grows its buffer only when waited on.
# On a 2-core CPU the autotuner's own work competes with the network: a feature pass of 20,000
# Fashion-MNIST images took 10.3 s with it (sometimes 20.5 s) and 9.1 s without it
# (bench/RESULTS.md §8).
_FIXED_PARALLELISM = tf.data.Options()
_FIXED_PARALLELISM.autotune.enabled = False


def feature_dataset(source: Source, resize_size: int, image_size: int, batch_size: int,
                    order: Optional[np.ndarray] = None) -> tf.data.Dataset:
    """Every example once, centre-cropped, as batches of (images, indices, labels).

    Args:
      order: int [N] order to read a random-access source in (None = index order).
    Yields:
      float32 [B, S, S, C] pixels in [0, 255], int64 [B] indices, int64 [B] labels (-1 unknown).
      Examples that fail to decode are dropped; the caller finds them as missing indices.
    """
    if source.decodes_batches:  # one map per batch
        def load(indices, payloads, labels):
            images = source.decode(indices, payloads)
            return transforms.center_crop(images, resize_size, image_size), indices, labels

        ds = source.triples(order, batch_size).map(load)
    else:
        def load(index, payload, label):
            image = source.decode(index, payload)
            return transforms.center_crop(image, resize_size, image_size), index, label

        ds = source.triples(order).map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().batch(batch_size)
    return ds.prefetch(AUTOTUNE).with_options(_FIXED_PARALLELISM)


def training_dataset(source: Source, labels: tf.Variable, accept: tf.Variable, image_size: int,
                     crop_scale: tuple, crop_ratio: tuple, batch_size: int, seed: int,
                     shard: tuple = (1, 0)) -> tf.data.Dataset:
    """Endless batches of (augmented images, indices), balanced over the current clusters.

    Only accepted indices are decoded and augmented. The pseudo-labels are *not* part of the
    batch: prefetched batches are prepared before the callback reclusters, so train_step looks
    the labels up by index instead.

    Args:
      shard: (number of input pipelines, this one's id): every pipeline draws the same accepted
        index stream and decodes only its share of it (tf.distribute, one pipeline per worker).
    Yields:
      float32 [B, S, S, C] pixels in [0, 255], int32 [B] example indices.
    """
    def load(index, payload):
        image = source.decode(index, payload)
        view = transforms.random_resized_crop(image, image_size, crop_scale, crop_ratio)
        return view, tf.cast(index, tf.int32)

    ds = sampler.accepted_pairs(source, labels, accept, seed)
    if shard[0] > 1:
        ds = ds.shard(*shard)
    ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors()
    return ds.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)
