"""Reading a dc_tf export for evaluation: pooled, flattened endpoint features of whole datasets.

`ExportedBackbone` wraps the SavedModel alone (no dc_tf model code) and what the export says
about itself (`read_export_info`); `pool_spec` chooses the average pool that brings a conv
endpoint to about 9k values (docs/protocols.md §3); `extract_features` sends a dataset through
it once, keeping features in memory or in np.memmap files.
"""

import dataclasses
import math
import os
import time
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from dc_core import transforms
from dc_core.errors import ConfigError
from dc_core.export_info import INFO_FILE, REEXPORT, read_export_info

TARGET_DIM = 9216
_LOG_EVERY_S = 30.0

# ------------------------------------------------------------------------------ pooling

def pooled_shape(height: int, width: int, channels: int, kernel: int, pad: int) -> tuple:
    """(h, w, c) after a kernel x kernel average pool, stride = kernel, `pad` zeros each side."""
    return ((height + 2 * pad - kernel) // kernel + 1,
            (width + 2 * pad - kernel) // kernel + 1, channels)


def pool_spec(height: int, width: int, channels: int, target_dim: int = TARGET_DIM) -> tuple:
    """(kernel, pad) of the average pool bringing a conv map closest to target_dim values.

    Rule: a square window, stride = kernel, 0 <= pad <= kernel // 2 zeros per side (counted in
    the average, as torch.nn.AvgPool2d's count_include_pad; the pad limit is PyTorch's);
    minimise |C·h·w - target_dim|, then the kernel, then the pad; kernel 1 is no pooling. It
    reproduces the paper's AlexNet table (conv1 6/6/3, conv2 4/4/0, conv3-4 3/3/1, conv5 2/2/0);
    small_vgg at 32 px gets conv1 2/2/1 (9248), conv2 2/2/1 (5184), conv3 none (8192).
    """
    best = (math.inf,)
    for kernel in range(1, max(height, width) + 1):
        for pad in range(kernel // 2 + 1):
            h, w, c = pooled_shape(height, width, channels, kernel, pad)
            if h >= 1 and w >= 1:
                best = min(best, (abs(h * w * c - target_dim), kernel, pad))
    return best[1:]


# ------------------------------------------------------------------------------ the export

# dc_tf's architectures by the name and channels of their last conv endpoint: how an export
# without INFO_FILE (another library's, or one of a dc_tf older than that file) is recognised.
_ARCH_SIGNS = {("conv5", 256): "alexnet", ("conv5", 512): "vgg16", ("conv5", 2048): "resnet50",
               ("conv3", 128): "small_vgg"}
KNOWN_ARCHS = "AlexNet, VGG16, ResNet-50 and small_vgg exports of dc_tf"


def guess_arch(shapes: dict) -> Optional[str]:
    """The dc_tf architecture whose endpoints `shapes` ({name: shape without batch}) look like,
    by the last conv endpoint's name and channels; None if none does."""
    convs = sorted(name for name, shape in shapes.items()
                   if name.startswith("conv") and len(shape) == 3)
    return _ARCH_SIGNS.get((convs[-1], shapes[convs[-1]][-1])) if convs else None


def unknown_arch(what: str, shapes: dict, arch: Optional[str], needs: tuple = ()) -> ConfigError:
    """The error of an evaluation that needs the architecture (`what` it cannot tell): it does
    not know `arch` (None: neither INFO_FILE nor the endpoint shapes told one), or the export
    lacks endpoints `needs` that its rule for `arch` reads."""
    endpoints = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    missing = sorted({name for name in needs if name not in shapes})
    if arch and missing:
        return ConfigError(f"--model: cannot tell {what} this {arch} export: it lacks "
                           f"{', '.join(missing)} of that architecture; its endpoints are "
                           f"{endpoints}")
    if arch:
        return ConfigError(f"--model: cannot tell {what} a {arch} export; known: {KNOWN_ARCHS}")
    return ConfigError(f"--model: cannot tell {what} an export with endpoints {endpoints}; known:"
                       f" {KNOWN_ARCHS}. A dc_tf export names its architecture in {INFO_FILE}: "
                       f"{REEXPORT}")


class ExportedBackbone:
    """A frozen SavedModel: uint8 [B, S, S, C] images in, flat float32 features out.

    Attributes: path; image_size S and channels C of its input; shapes, endpoint -> shape
    without the batch axis (sorted by name); pools, conv endpoint -> (kernel, pad); info, the
    export's INFO_FILE (None without one: any SavedModel with the signatures is evaluated);
    arch, the architecture it names (None if it names none).
    """

    def __init__(self, path: str):
        try:
            self._loaded = tf.saved_model.load(path)  # owns the variables the signature reads
            self._serve = self._loaded.signatures["serving_default"]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"--model={path} is not a dc_tf export ({type(e).__name__}: {e}); "
                              "pass MODEL_DIR/export of a dc_tf.train run") from e
        self.path = path
        spec = self._serve.structured_input_signature[1]["images"]
        self.image_size, self.channels = int(spec.shape[1]), int(spec.shape[3])
        self.shapes = {name: tuple(s.shape[1:])
                       for name, s in sorted(self._serve.structured_outputs.items())}
        self.pools = {name: pool_spec(*shape) for name, shape in self.shapes.items()
                      if len(shape) == 3}
        self.info = read_export_info(path)
        self.arch = (self.info or {}).get("arch")
        self._extractors = {}

    def architecture(self, what: str) -> Optional[str]:
        """The architecture for an evaluation that needs it to tell `what`: INFO_FILE's; else
        the dc_tf architecture the endpoint shapes look like, with a warning; else None."""
        if self.arch:
            return self.arch
        guess = guess_arch(self.shapes)
        if guess:
            logging.warning("%s names no architecture (%s %s): %s follows its endpoint shapes, "
                            "those of a dc_tf %s; %s", self.path, INFO_FILE,
                            "lacks arch" if self.info else "is missing", what, guess, REEXPORT)
        return guess

    def require(self, layers, flag: str) -> None:
        """Fails, listing the endpoints there are, unless every layer is one of them."""
        missing = [layer for layer in layers if layer not in self.shapes]
        if missing:
            raise ConfigError(f"--{flag}={','.join(missing)}: the SavedModel {self.path} has no "
                              f"such endpoint; its endpoints are {', '.join(self.shapes)}")

    def dim(self, layer: str) -> int:
        """Length of the flat feature of `layer`."""
        shape = self.shapes[layer]
        return int(np.prod(pooled_shape(*shape, *self.pools[layer]) if len(shape) == 3 else shape))

    def features(self, images, layers: tuple) -> dict:
        """uint8 [B * V, S, S, C] (any leading axes) -> {layer: float32 [B * V, dim(layer)]}."""
        if layers not in self._extractors:
            def extract(batch):
                outputs = self._serve(images=tf.reshape(
                    batch, [-1, self.image_size, self.image_size, self.channels]))
                flat = {}
                for layer in layers:
                    x = outputs[layer]
                    if layer in self.pools:
                        kernel, pad = self.pools[layer]
                        x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
                        x = tf.nn.avg_pool2d(x, kernel, kernel, "VALID")
                    flat[layer] = tf.reshape(x, [tf.shape(x)[0], -1])
                return flat
            self._extractors[layers] = tf.function(extract, reduce_retracing=True)
        return self._extractors[layers](images)


# ------------------------------------------------------------------------------ views, features

def view_dataset(source, backbone: ExportedBackbone, resize_size: int, view: str,
                  batch_size: int, seed: int = 0, order: Optional[np.ndarray] = None):
    """Batches of (uint8 [B, V, S, S, C] views, int64 [B] labels); undecodable images dropped.

    view: "centre" (V = 1), "ten_crop" (V = 10, the centre crop first) or "augment" (V = 1: a
    random crop and flip of the central resize_size square, seeded by `seed` and the index).
    """
    size, channels = backbone.image_size, backbone.channels

    def load(index, payload, label):
        image = source.decode(index, payload)
        if image.shape[-1] != channels:  # a grayscale export on RGB data, or the reverse
            image = (tf.image.rgb_to_grayscale(image) if channels == 1
                     else tf.image.grayscale_to_rgb(image))
        if view == "centre":
            views = transforms.center_crop(image, resize_size, size)[None]
        elif view == "augment":
            square = transforms.center_crop(image, resize_size, resize_size)
            crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
                tf.stack([tf.constant(seed, tf.int64), index]), 2))
            crop = tf.image.stateless_random_crop(square, [size, size, channels], crop_seed)
            views = tf.image.stateless_random_flip_left_right(crop, flip_seed)[None]
        else:
            square = transforms.center_crop(image, resize_size, resize_size)
            far = resize_size - size
            crops = tf.stack([square[t:t + size, l:l + size] for t, l in (
                (far // 2, far // 2), (0, 0), (0, far), (far, 0), (far, far))])
            views = tf.concat([crops, tf.reverse(crops, axis=[2])], 0)
        return tf.cast(tf.clip_by_value(tf.round(views), 0, 255), tf.uint8), label

    ds = source.triples(order)
    if view == "augment" and not source.random_access:
        ds = ds.shuffle(10_000, seed=seed)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


class Progress:
    """Logs `what: done/total (rate)` at most every _LOG_EVERY_S seconds."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.time()

    def update(self, n: int) -> None:
        self.done += n
        if time.time() - self.last >= _LOG_EVERY_S:
            self.last = time.time()
            logging.info("%s: %d/%d (%.0f/s)", self.what, self.done, self.total,
                         self.done / (self.last - self.start))


class FeatureStore:
    """Hands out float32 arrays: in memory up to `budget_bytes`, then np.memmap files in
    `folder` (which the caller deletes)."""

    def __init__(self, budget_bytes: float, folder: str):
        self.budget, self.folder = budget_bytes, folder
        self.memory_bytes = self.disk_bytes = 0

    def empty(self, name: str, shape: tuple) -> np.ndarray:
        size = 4 * int(np.prod(shape))
        if self.memory_bytes + size <= self.budget:
            self.memory_bytes += size
            return np.empty(shape, np.float32)
        self.disk_bytes += size
        return np.lib.format.open_memmap(os.path.join(self.folder, f"{name}.npy"), "w+",
                                         np.float32, shape)


@dataclasses.dataclass
class SplitFeatures:
    """Pooled features of a split: arrays, layer -> float32 [n * views, dim] (example i's views
    are rows i*views.., its centre crop first); labels int64 [n]; skipped: undecodable images."""
    arrays: dict
    labels: np.ndarray
    views: int
    skipped: int

    def centre(self, layer: str) -> np.ndarray:
        """float32 [n, dim] centre-crop features."""
        return self.arrays[layer][::self.views]


def extract_features(backbone: ExportedBackbone, source, layers: tuple, resize_size: int,
                     ten_crop: bool, batch_size: int, store: FeatureStore,
                     split: str) -> SplitFeatures:
    """Runs every example of `source` through the backbone once."""
    views, total = 10 if ten_crop else 1, source.num_examples
    ds = view_dataset(source, backbone, resize_size, "ten_crop" if ten_crop else "centre",
                       max(1, batch_size // views))
    arrays = {layer: store.empty(f"{split}_{layer}", (total * views, backbone.dim(layer)))
              for layer in layers}
    labels = np.empty(total, np.int64)
    n, progress = 0, Progress(f"{split} features of {source.name}", total)
    for images, batch_labels in ds:
        b = int(batch_labels.shape[0])
        flat = backbone.features(images, layers)
        for layer in layers:
            arrays[layer][n * views:(n + b) * views] = flat[layer].numpy()
        labels[n:n + b] = batch_labels.numpy()
        n += b
        progress.update(b)
    if n == 0 or labels[:n].min() < 0:
        what = "no readable image" if n == 0 else "unlabelled examples"
        raise ConfigError(f"{source.name} has {what}; the evaluation needs labelled images")
    return SplitFeatures({k: v[:n * views] for k, v in arrays.items()}, labels[:n], views,
                         total - n)
