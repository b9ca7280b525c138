"""A dc_tf.train run read back: its configuration, its restored backbone, and its images."""

import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dc_core import transforms
from dc_tf import config, data, methods
from dc_tf.checkpoint import RunCheckpoint
from dc_tf.run_dir import RunDir
from dc_tf.visualization import montage

LOG_EVERY_S = 30.0


class Progress:
    """Logs `what: done/total (rate)` at most every LOG_EVERY_S seconds."""

    def __init__(self, what: str, total: int, unit: str = "images"):
        self.what, self.total, self.unit, self.done = what, total, unit, 0
        self.start = self.last = time.time()

    def update(self, n: int, extra: str = "") -> None:
        self.done += n
        if time.time() - self.last >= LOG_EVERY_S:
            self.last = time.time()
            logging.info("%s: %d/%d %s (%.1f/s)%s", self.what, self.done, self.total, self.unit,
                         self.done / (self.last - self.start), extra)


def load_config(model_dir: str) -> config.TrainConfig:
    """The resolved TrainConfig of the run in model_dir (its config.json)."""
    path = RunDir(model_dir).config
    if not os.path.exists(path):
        raise config.ConfigError(f"--model={model_dir}: no config.json there; pass the "
                                 "--model_dir of a dc_tf.train run")
    with open(path) as f:
        cfg = config.TrainConfig.from_json(f.read())
    if not cfg.channels or not cfg.num_examples:
        raise config.ConfigError(f"--model={model_dir}: config.json lacks the dataset's channels "
                                 "and size; the run never opened its dataset")
    return cfg


def restore_backbone(cfg: config.TrainConfig) -> tuple:
    """(backbone keras.Model, epochs done): the run's network with its latest checkpoint's
    weights, or with the seeded initial weights of an --epochs=0 run (which has none)."""
    keras.utils.set_random_seed(cfg.seed)  # as dc_tf.train builds it
    method = methods.for_config(cfg)
    backbone = method.backbone()
    model = method.build_model(backbone)
    epochs = RunCheckpoint(model, RunDir(cfg.model_dir).checkpoints).restore()
    if epochs == 0 and cfg.epochs > 0:
        raise config.ConfigError(f"--model={cfg.model_dir}: no checkpoint in its checkpoints/ "
                                 "yet; wait for the run's first epoch to finish")
    return backbone, epochs


def check_layer(backbone: keras.Model, layer: str) -> None:
    """Fails, listing the endpoints there are, unless `layer` is one."""
    if layer not in backbone.output:
        raise config.ConfigError(f"--layer={layer}: {backbone.name} has no such endpoint; its "
                                 f"endpoints are {', '.join(sorted(backbone.output))}")


def deepest_conv(backbone: keras.Model) -> str:
    """The last convolutional endpoint (conv5 of AlexNet and VGG16, conv3 of small_vgg)."""
    return sorted(name for name, t in backbone.output.items() if len(t.shape) == 4)[-1]


def open_source(cfg: config.TrainConfig, dataset: str = "", data_dir: str = "",
                max_examples: int = 0) -> data.Source:
    """The run's training images (every one it clustered), or another --dataset."""
    if not dataset:
        return data.open_source(cfg.dataset, cfg.data_dir, cfg.num_examples)
    return data.open_source(dataset, data_dir, max_examples)


def view_dataset(source: data.Source, resize_size: int, image_size: int, channels: int,
                 batch_size: int, indices: Optional[np.ndarray] = None) -> tf.data.Dataset:
    """Batches of the feature-pass view of examples: (float32 [B, S, S, C] pixels in [0, 255],
    int64 [B] indices, int64 [B] labels), undecodable examples dropped.

    Args:
      resize_size, image_size: shorter side resized to resize_size, centre crop image_size.
      channels: C; grayscale and RGB images are converted to it.
      indices: read only these examples (None: all), in increasing order. A sequentially read
        source (tfds:) streams its records up to the largest of them.
    """
    if indices is None:
        ds = source.triples()
    elif source.random_access:
        ds = source.triples(np.unique(indices))
    else:
        wanted = tf.constant(np.unique(indices), tf.int64)
        ds = source.triples().take(int(wanted[-1]) + 1).filter(
            lambda i, payload, label: tf.reduce_any(tf.equal(i, wanted)))

    def load(index, payload, label):
        image = source.decode(index, payload)
        if image.shape[-1] != channels:
            image = (tf.image.rgb_to_grayscale(image) if channels == 1
                     else tf.image.grayscale_to_rgb(image))
        return transforms.center_crop(image, resize_size, image_size), index, label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_views(source: data.Source, indices: np.ndarray, resize_size: int, image_size: int,
               channels: int) -> dict:
    """{index: uint8 [S, S, C] view} of the given examples that decode."""
    views = {}
    for images, idx, _ in view_dataset(source, resize_size, image_size, channels, 256, indices):
        views.update(zip(idx.numpy().tolist(), montage.to_uint8(images.numpy())))
    return views
