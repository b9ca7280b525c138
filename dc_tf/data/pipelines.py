"""The tf.data pipelines of a run: the ordered feature pass, DeepCluster's balanced training
stream and DeepCluster-v2's multi-crop stream."""

import math
import re
from typing import Optional

import numpy as np
import tensorflow as tf

from dc_core import transforms
from dc_core.sources import Source
from dc_tf.data import sampler

AUTOTUNE = tf.data.AUTOTUNE


# tf.data's autotuner off for the feature pass: its map then runs one call per core (tf.data's
# default for AUTOTUNE without the autotuner) and prefetch grows its buffer only when waited on.
# On a 2-core CPU the autotuner's own work competes with the network: a feature pass of 20,000
# Fashion-MNIST images took 10.3 s with it (sometimes 20.5 s) and 9.1 s without it
# (bench/RESULTS.md §8).
_FIXED_PARALLELISM = tf.data.Options()
_FIXED_PARALLELISM.autotune.enabled = False

# The images a training epoch may read per image it trains on (DeepCluster-v2: its passes over
# the examples). ignore_errors() drops the images that fail to decode: unbounded, an epoch whose
# images mostly vanished since the feature pass would draw and fail forever without a word, and
# one DeepCluster-v2 pass falls short of the epoch's steps on a folder with more unreadable
# images than a batch's remainder.
_READS_PER_IMAGE = 2


# The feature pass's batch: inference has no reason to use small SGD batches, and larger ones
# run faster. The least multiple of the training batch, which splits evenly over the replicas,
# that holds FEATURE_BATCH images.
FEATURE_BATCH = 256


def feature_batch_size(batch_size: int) -> int:
    return batch_size * math.ceil(FEATURE_BATCH / batch_size)


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


def training_dataset(source: Source, labels: tf.Variable, accept: tf.Variable,
                     epoch: tf.Variable, image_size: int, crop_scale: tuple, crop_ratio: tuple,
                     batch_size: int, steps: int, seed: int,
                     shard: tuple = (1, 0)) -> tf.data.Dataset:
    """One epoch of `steps` batches of (augmented images, indices), balanced over the clusters.

    Only accepted indices are decoded and augmented. Each iterator draws the stream of the epoch
    held in `epoch` when it starts, with the labels and acceptance probabilities of that moment:
    Keras starts a new iterator at every epoch of a dataset of known length, after the epoch's
    callbacks, so the stream follows each new clustering from the epoch's first batch whatever
    the prefetch depth and parallelism. Every draw (proposals, acceptance, crops, flips) is a
    stateless op keyed by the seed, the epoch and the image's place in the stream: one seed gives
    one stream, also across a resume. The pseudo-labels are *not* part of the batch: train_step
    looks them up by index.

    Args:
      epoch: int64 scalar variable, the epoch about to be trained (set by the labelling callback).
      steps: batches per epoch.
      shard: (number of input pipelines, this one's id): every pipeline draws the same accepted
        index stream and decodes only its share of it (tf.distribute, one pipeline per worker).
    Yields:
      float32 [B, S, S, C] pixels in [0, 255], int32 [B] example indices. Images that fail to
      decode are dropped; an epoch reads at most _READS_PER_IMAGE times the images it trains on,
      and fails with an InvalidArgumentError that says so when they do not fill its steps.
    """
    def one_epoch(epoch):
        views = sampler.stream_key(seed, epoch, salt=1)

        def load(position, pair):
            index, payload = pair
            image = source.decode(index, payload)
            view = transforms.random_resized_crop(
                image, image_size, crop_scale, crop_ratio,
                seed=tf.random.experimental.stateless_fold_in(views, position))
            return view, tf.cast(index, tf.int32)

        pairs = sampler.accepted_pairs(source, labels, accept, sampler.stream_key(seed, epoch))
        return _epoch_batches(
            pairs, load, batch_size, steps, shard, source.name,
            "the stream holds only images the last feature pass decoded (with --supervised, "
            "every image), so most of them vanished or became unreadable since")

    return _per_epoch(epoch, one_epoch, steps)


# How the error of an epoch that its readable images cannot fill begins (`short_epoch`).
SHORT_EPOCH = "too few readable images: fewer than "


def short_epoch(error: tf.errors.OpError) -> Optional[str]:
    """The message of `_epoch_batches`'s error, if `error` is one (None otherwise)."""
    match = re.search(re.escape(SHORT_EPOCH) + r"[^\]\n]*", error.message)
    return match.group(0) if match else None


def _epoch_batches(pairs: tf.data.Dataset, load, batch_size: int, steps: int, shard: tuple,
                   name: str, why: str) -> tf.data.Dataset:
    """`steps` batches of the first _READS_PER_IMAGE * steps * batch_size (times the pipelines)
    (index, payload) `pairs` that `load(position, pair)` turns into training examples, those that
    fail dropped; an error that says `why` when the rest do not fill them."""
    reads = _READS_PER_IMAGE * steps * batch_size * shard[0]
    # Positions before sharding: an image's views do not depend on the worker count.
    ds = pairs.take(reads).enumerate()
    if shard[0] > 1:
        ds = ds.shard(*shard)
    ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors()
    batches = ds.batch(batch_size, drop_remainder=True)
    message = (f"{SHORT_EPOCH}{steps * batch_size * shard[0]} of the {reads} images this epoch "
               f"read from {name} could be decoded: {why}. The checkpoints of finished epochs "
               "are intact: make the images readable again and re-run the same command to "
               "resume, or start a new run")

    def short(_):  # reached only when the batches above are fewer than `steps`
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            # Never returned: an element of the batches' structure, unknown sizes as 0.
            return tf.nest.map_structure(
                lambda spec: tf.identity(tf.zeros([d or 0 for d in spec.shape], spec.dtype)),
                batches.element_spec)

    return batches.concatenate(tf.data.Dataset.range(1).map(short)).take(steps)


def _per_epoch(epoch: tf.Variable, one_epoch, steps: int) -> tf.data.Dataset:
    """A dataset of `steps` batches that each iterator builds anew as one_epoch(epoch), with
    the value `epoch` holds when the iterator starts, not when the pipeline is built."""
    ds = tf.data.Dataset.range(1).map(lambda _: tf.convert_to_tensor(epoch)).flat_map(one_epoch)
    return ds.prefetch(AUTOTUNE).apply(tf.data.experimental.assert_cardinality(steps))


def multicrop_dataset(source: Source, epoch: tf.Variable, image_size: int, global_crops: int,
                      global_scale: tuple, local_crops: int, local_size: int, local_scale: tuple,
                      crop_ratio: tuple, batch_size: int, steps: int, seed: int,
                      color_jitter: float = 0.0, blur: bool = False,
                      shard: tuple = (1, 0)) -> tf.data.Dataset:
    """One epoch of `steps` batches of multi-crop views (DeepCluster-v2, docs/protocols.md §9).

    Every example once per epoch, in an order keyed by (seed, epoch), then, as far as unreadable
    examples leave the epoch short, in a second order (an error when that is not enough, as in
    `training_dataset`); each image is decoded once and gives `global_crops` global crops
    (random resized crops of `global_scale` of its area, at image_size) and `local_crops` local
    ones (`local_scale`, at local_size), each randomly flipped, colour-distorted with strength
    `color_jitter` (0: not at all; see `transforms.color_distortion`) and, with `blur`, blurred
    with probability 0.5 by a Gaussian of 0.1-2 px per 224 px of the view's side; all drawn by
    stateless ops keyed by the seed, the epoch and the image's place in the stream, as
    `training_dataset`; `shard` too is `training_dataset`'s (each pipeline decodes its share of
    the epoch's order).

    Yields:
      (tuple of global_crops + local_crops float32 [B, s, s, C] views, global ones first),
      int32 [B]
      example indices.
    """
    def one_epoch(epoch):
        views = sampler.stream_key(seed, epoch, salt=3)
        # The epoch's order, then more passes in orders of their own: unreadable examples leave
        # the first pass short of the epoch's steps.
        keys = [sampler.stream_key(seed, epoch, salt=4 + p if p else 0)
                for p in range(_READS_PER_IMAGE)]
        shapes = ([(image_size, global_scale)] * global_crops
                  + [(local_size, local_scale)] * local_crops)

        def load(position, pair):
            index, payload = pair
            image = source.decode(index, payload)
            seeds = tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(views, position), len(shapes))
            crops = tuple(_view(image, size, scale, crop_ratio, source.channels, color_jitter,
                                blur, seeds[i]) for i, (size, scale) in enumerate(shapes))
            return crops, tf.cast(index, tf.int32)

        return _epoch_batches(
            _passes(source, keys), load, batch_size, steps, shard, source.name,
            f"each example was read up to {_READS_PER_IMAGE} times, so more than "
            f"{100 // _READS_PER_IMAGE} % of them are unreadable, or vanished during the run")

    return _per_epoch(epoch, one_epoch, steps)


def _passes(source: Source, keys: list) -> tf.data.Dataset:
    """(index, payload) of every example once per key, each pass in the key's order."""
    if source.random_access:
        order = tf.concat([tf.random.experimental.stateless_shuffle(
            tf.range(source.num_examples, dtype=tf.int64), seed=key) for key in keys], 0)
        return tf.data.Dataset.from_tensor_slices((order, order))
    pairs = source.triples().map(lambda index, payload, label: (index, payload))
    ds = pairs.shuffle(10_000, seed=keys[0][0] ^ keys[0][1])
    for key in keys[1:]:
        ds = ds.concatenate(pairs.shuffle(10_000, seed=key[0] ^ key[1]))
    return ds


def _view(image: tf.Tensor, size: int, scale: tuple, crop_ratio: tuple, channels: int,
          color_jitter: float, blur: bool, view_seed: tf.Tensor) -> tf.Tensor:
    """One multi-crop view: random resized crop, colour distortion, blur (multicrop_dataset)."""
    crop_seed, color_seed, blur_seed = tf.unstack(
        tf.random.experimental.stateless_split(view_seed, 3))
    crop = tf.ensure_shape(  # static channels: the colour distortion depends on them
        transforms.random_resized_crop(image, size, scale, crop_ratio, crop_seed),
        [size, size, channels])
    if color_jitter:
        crop = transforms.color_distortion(crop, color_jitter, color_seed)
    if blur:
        crop = transforms.gaussian_blur(crop, (0.1 * size / 224, 2.0 * size / 224), blur_seed)
    return crop
