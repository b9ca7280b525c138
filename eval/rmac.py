"""Retrieval descriptors (docs/protocols.md §6): R-MAC, MAC and GeM over an export's conv endpoint.

docs/protocols.md §6, after Tolias et al. (ICLR 2016) and deepcluster's eval_retrieval.py: the
feature map of an image (VGG16 conv5_3 after ReLU, no final pool) is max-pooled over square
regions on 3 levels (`rmac_regions`); each regional vector is L2-normalised, PCA-whitened (the
whitening learned on the regional vectors of *another* dataset), L2-normalised again, summed over
the regions and L2-normalised. MAC (one region, the whole map) and GeM (generalised mean,
Radenović et al. 2018) go through the same steps with a single vector per image. With several
scales the regional vectors of every scale are pooled into one set before the sum.

Numeric parts are numpy in, numpy out; `ConvExport` runs the export's `conv_features` signature
(uint8 images of any size) and is the only part that needs TensorFlow.
"""

import dataclasses
import json
import math
import os
from typing import Optional

import numpy as np
import tensorflow as tf
from absl import logging

from dc_core.clustering import PCAWhitening, fit_pca_whitening, l2_normalize
from dc_core.errors import ConfigError
from eval.features import Progress

POOLINGS = ("rmac", "mac", "gem")
OVERLAP = 0.4  # Tolias et al.: desired overlap of neighbouring regions
# Regularises the whitening: added to every eigenvalue as a fraction of the total variance, so
# directions without variance (dead ReLU channels) are not blown up. deepcluster's PCA clamps
# eigenvalues below 1e-5 of the largest one instead; the effect is the same order.
WHITEN_EPS = 1e-5


# ------------------------------------------------------------------------------ regions

def rmac_regions(height: int, width: int, levels: int) -> np.ndarray:
    """The R-MAC regions of a height x width feature map (Tolias et al.'s rmac_regions.m).

    At level l = 1..levels the regions are squares of side floor(2w / (l + 1)), w the shorter
    side, l of them along the short side and l + extra along the long one, evenly spaced; `extra`
    (0 for a square map) is the number of regions, minus one, that the long side gets at level 1:
    of the candidates 2..7 the one whose step b = (long - w) / (candidate - 1) makes neighbouring
    level-1 regions overlap closest to 40 %, i.e. minimises |(w² - w·b) / w² - 0.4|.
    Positions are rounded and pushed back inside the map, as deepcluster's
    get_rmac_region_coordinates does.
    Like cirtorch (not deepcluster) regions of side 0 (maps narrower than levels + 1) are
    skipped, and no whole-map region is added (cirtorch's rmac adds one).

    Args:
        height, width: feature-map size, >= 1.
        levels: L >= 1.

    Returns:
        int64 [R, 4] regions (x, y, side, side) in map cells.
    """
    if height < 1 or width < 1 or levels < 1:
        raise ValueError(f"rmac_regions needs a map of at least 1x1 and levels >= 1; got "
                         f"{height}x{width}, levels={levels}")
    w = min(height, width)
    steps = np.arange(2, 8, dtype=np.float64)
    b = (max(height, width) - w) / (steps - 1)
    extra = int(np.argmin(np.abs((w * w - w * b) / (w * w) - OVERLAP))) + 1
    extra_w, extra_h = (extra, 0) if height < width else ((0, extra) if height > width else (0, 0))
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * w / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        starts = []
        for size, n in ((width, level + extra_w), (height, level + extra_h)):
            step = (size - side) / (n - 1) if n > 1 else 0.0
            starts.append(np.floor(half + step * np.arange(n)) - half)
        for y in starts[1]:
            for x in starts[0]:
                x, y = int(round(x)), int(round(y))
                regions.append((min(x, width - side), min(y, height - side), side, side))
    return np.array(regions, np.int64).reshape(-1, 4)


# ------------------------------------------------------------------------------ pooling

def regional_vectors(fmap: np.ndarray, pooling: str, levels: int = 3,
                     gem_p: float = 3.0) -> np.ndarray:
    """The L2-normalised vectors one feature map contributes to its image's descriptor.

    Args:
        fmap: float [h, w, c] post-ReLU feature map.
        pooling: "rmac" (a spatial max per `rmac_regions` region), "mac" (the max over the map)
            or "gem" (generalised mean (mean x^p)^(1/p) over the map, x clamped at 1e-6).
        levels, gem_p: R-MAC levels; GeM exponent p.

    Returns:
        float32 [R, c]; R = 1 for mac and gem.
    """
    fmap = np.asarray(fmap, np.float32)
    if fmap.ndim != 3:
        raise ValueError(f"expected a feature map [h, w, c], got shape {fmap.shape}")
    if pooling == "rmac":
        vectors = np.stack([fmap[y:y + s, x:x + s].max((0, 1))
                            for x, y, s, _ in rmac_regions(*fmap.shape[:2], levels)])
    elif pooling == "mac":
        vectors = fmap.max((0, 1))[None]
    elif pooling == "gem":
        vectors = (np.maximum(fmap, 1e-6) ** gem_p).mean((0, 1))[None] ** (1.0 / gem_p)
    else:
        raise ValueError(f"pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
    return l2_normalize(vectors)


def aggregate(vectors: np.ndarray, whitening: Optional[PCAWhitening]) -> np.ndarray:
    """An image's descriptor: whiten and L2-normalise each vector, sum them, L2-normalise.

    Args:
        vectors: float32 [R, c] from `regional_vectors` (all scales of one image).
        whitening: applied to every vector when given.

    Returns:
        float32 [d], d = whitening.output_dim or c.
    """
    if whitening is not None:
        vectors = l2_normalize(whitening.apply(vectors))
    return l2_normalize(vectors.sum(0, keepdims=True))[0]


# ------------------------------------------------------------------------------ whitening

def fit_whitening(vectors: np.ndarray, dim: int = 0) -> PCAWhitening:
    """PCA-whitening of regional vectors (`dc_core.clustering.fit_pca_whitening`).

    Args:
        vectors: float [n, c] L2-normalised regional vectors of the learning dataset.
        dim: components kept (0 = min(c, n)).

    Returns:
        The whitening, float32 mean [c] and matrix [c, dim].
    """
    n, width = vectors.shape
    dim = dim or min(width, n)
    if dim > min(width, n):
        raise ConfigError(f"--whiten_dim={dim} exceeds what {n} vectors of {width} dimensions "
                          f"can give ({min(width, n)}); lower --whiten_dim or pass 0")
    total = float(np.var(vectors, axis=0, dtype=np.float64).sum())
    return fit_pca_whitening(vectors, dim, eps=WHITEN_EPS * total + 1e-12)


def save_whitening(path: str, whitening: PCAWhitening, meta: dict) -> str:
    """Writes the whitening and `meta` (what it was learned on, how) to a .npz file."""
    tmp = path + ".tmp.npz"
    np.savez(tmp, mean=whitening.mean, matrix=whitening.matrix, meta=json.dumps(meta))
    os.replace(tmp, path)
    return path


def load_whitening(path: str, settings: dict, dim: int) -> tuple:
    """(PCAWhitening, meta dict) read back from `save_whitening`'s file, refused unless it was
    learned with `settings` (the flags of the same names; "model" only warns) on `dim`-d
    vectors."""
    try:
        with np.load(path) as f:
            whitening = PCAWhitening(mean=f["mean"], matrix=f["matrix"])
            meta = json.loads(str(f["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"--whitening={path} is not a whitening saved by eval.retrieval "
                          f"({type(e).__name__}: {e}); pass the *_whitening.npz written next to "
                          "an earlier --output") from e
    for key, value in settings.items():
        if key != "model" and meta.get(key) != value:
            raise ConfigError(f"--whitening={path} was learned with --{key}={meta.get(key)} but "
                              f"this run has --{key}={value}; use the same settings or learn a "
                              "new one with --whiten_on")
    if whitening.input_dim != dim:
        raise ConfigError(f"--whitening={path} whitens {whitening.input_dim}-d vectors, the "
                          f"--layer of this --model has {dim} channels; learn one with --whiten_on")
    if meta.get("model") != settings.get("model"):
        logging.warning("--whitening=%s was learned on the features of %s", path,
                        meta.get("model"))
    return whitening, meta


# ------------------------------------------------------------------------------ the export

class ConvExport:
    """The `conv_features` signature of a dc_tf export, reduced to one endpoint.

    Attributes: path; layer; layers, the conv endpoints there are; image_size S and channels C
    of the export's training input; upscaled, views enlarged because the network refused them.
    """

    def __init__(self, path: str, layer: str = ""):
        try:
            self._loaded = tf.saved_model.load(path)  # owns the variables the signatures read
            self._conv = self._loaded.signatures["conv_features"]
            serve = self._loaded.signatures["serving_default"]
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"--model={path} is not a dc_tf export with a conv_features "
                              f"signature ({type(e).__name__}: {e}); pass MODEL_DIR/export of "
                              "a dc_tf.train run") from e
        spec = serve.structured_input_signature[1]["images"]
        self.path, self.image_size, self.channels = path, int(spec.shape[1]), int(spec.shape[3])
        shapes = {name: s.shape for name, s in serve.structured_outputs.items()}
        self.layers = sorted(self._conv.structured_outputs)
        # The last conv endpoint: the smallest map at the training size, the later name on ties.
        self.layer = layer or max(self.layers, key=lambda n: (-shapes[n][1] * shapes[n][2], n))
        if self.layer not in self.layers:
            raise ConfigError(f"--layer={layer}: the export {path} has no such conv endpoint; "
                              f"its conv endpoints are {', '.join(self.layers)}")
        self.dim = int(shapes[self.layer][-1])
        self.upscaled = 0

    def feature_map(self, view) -> np.ndarray:
        """float32 [h, w, c] endpoint of one uint8 [H, W, C] view.

        A view smaller than the architecture accepts (a small query box) is enlarged so that its
        shorter side is S, the training size, which every architecture accepts.
        """
        try:
            return self._conv(images=view[None])[self.layer][0].numpy()
        except tf.errors.InvalidArgumentError:
            h, w = int(view.shape[0]), int(view.shape[1])
            if min(h, w) >= self.image_size:
                raise
        factor = self.image_size / min(h, w)
        size = [max(self.image_size, round(h * factor)), max(self.image_size, round(w * factor))]
        big = tf.image.resize(view, size, antialias=True)
        self.upscaled += 1
        return self.feature_map(tf.cast(tf.clip_by_value(tf.round(big), 0, 255), tf.uint8))


def load_views(items: list, max_size: int, scales: tuple, crop_first: bool,
               channels: int) -> tf.data.Dataset:
    """(index, uint8 [H, W, C] view) per image and scale; undecodable images are left out.

    Each image is resized by scale · max_size / (its longer side). A query's box [x1, y1, x2,
    y2] is in original pixels, its end exclusive: with crop_first (the revisited protocol,
    cirtorch) the original is cropped, then the crop resized by the same factor; otherwise (the
    classic protocol, deepcluster) the whole image is resized and the rounded scaled box cut out.

    Args:
        items: [(path, box float [4] or None)] in database or query order.
        max_size: longer side of an image at scale 1.
        scales: resize factors of the longer side (1 = max_size).
        crop_first: see above.
        channels: C of the export; RGB images become grayscale for C = 1.
    """
    has_box = bool(items) and items[0][1] is not None
    boxes = np.array([box if has_box else (0, 0, 0, 0) for _, box in items], np.float32)
    pairs = [(i, s) for i in range(len(items)) for s in scales]
    ds = tf.data.Dataset.from_tensor_slices((
        np.array([i for i, _ in pairs], np.int64),
        np.array([items[i][0] for i, _ in pairs]),
        boxes[[i for i, _ in pairs]].reshape(-1, 4),
        np.array([s for _, s in pairs], np.float32)))

    def load(index, path, box, scale):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        size = tf.cast(tf.shape(image)[:2], tf.float32)
        ratio = scale * max_size / tf.reduce_max(size)
        if has_box and crop_first:
            x1, y1, x2, y2 = tf.unstack(tf.maximum(tf.cast(tf.round(box), tf.int32), 0))
            image = image[y1:y2, x1:x2]
            size = tf.cast(tf.shape(image)[:2], tf.float32)
        new = tf.maximum(tf.cast(tf.round(size * ratio), tf.int32), 1)
        view = tf.image.resize(image, new, antialias=True)
        if has_box and not crop_first:
            x1, y1, x2, y2 = tf.unstack(tf.maximum(tf.cast(tf.round(box * ratio), tf.int32), 0))
            view = view[y1:y2, x1:x2]
        tf.debugging.assert_positive(tf.size(view), f"an empty query box in {path}")
        view = tf.cast(tf.clip_by_value(tf.round(view), 0, 255), tf.uint8)
        if channels == 1:  # a grayscale export on RGB data, as eval.features.view_dataset
            view = tf.image.rgb_to_grayscale(view)
        return index, view

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors().prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class DescriptorSpec:
    """How images become descriptors: the fields of the command line of the same names."""
    pooling: str = "rmac"
    levels: int = 3
    gem_p: float = 3.0
    max_size: int = 1024
    scales: tuple = (1.0,)


def image_vectors(export: ConvExport, items: list, spec: DescriptorSpec, crop_first: bool,
                  progress=None):
    """Yields (index, float32 [R, c] regional vectors of all scales) per decodable image."""
    parts = {}
    for index, view in load_views(items, spec.max_size, spec.scales, crop_first,
                                  export.channels):
        index = int(index)
        parts.setdefault(index, []).append(regional_vectors(
            export.feature_map(view), spec.pooling, spec.levels, spec.gem_p))
        if len(parts[index]) == len(spec.scales):  # kept only when every scale loaded
            yield index, np.concatenate(parts.pop(index))
            if progress is not None:
                progress.update(1)


def descriptors(export: ConvExport, items: list, spec: DescriptorSpec,
                whitening: Optional[PCAWhitening], crop_first: bool, what: str) -> tuple:
    """(float32 [n, d] descriptors, bool [n] decoded) of n = len(items) (path, box) pairs;
    rows of images that could not be read are zero."""
    dim = whitening.output_dim if whitening is not None else export.dim
    out, kept = np.zeros((len(items), dim), np.float32), np.zeros(len(items), bool)
    for index, vectors in image_vectors(export, items, spec, crop_first,
                                        Progress(what, len(items))):
        out[index], kept[index] = aggregate(vectors, whitening), True
    return out, kept


def learn_whitening(export: ConvExport, paths: list, spec: DescriptorSpec, dim: int,
                    what: str) -> tuple:
    """(PCAWhitening, {"num_images", "num_vectors"}) fitted on the regional vectors of whole
    images (no box) at every scale of `spec`."""
    parts = [v for _, v in image_vectors(export, [(p, None) for p in paths], spec, False,
                                         Progress(what, len(paths)))]
    if not parts:
        raise ConfigError(f"{what}: none of the {len(paths)} images could be read")
    vectors = np.concatenate(parts)
    return fit_whitening(vectors, dim), {"num_images": len(parts), "num_vectors": len(vectors)}
