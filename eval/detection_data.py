"""Images and boxes for eval.voc_detection: multi-scale flipped training batches, test batches,
and the ground truth in the detector's and in VOC's terms.

Boxes: VOC annotates inclusive 1-based pixels (xmin, ymin, xmax, ymax); the detector sees the
continuous 0-based pixel edges (xmin - 1, ymin - 1, xmax, ymax) of the resized image, and its
detections go back to the original image as (x1 + 1, y1 + 1, x2, y2), as detectron2's VOC
evaluator writes them. Difficult objects get class -2, which KerasHub's label encoder treats as
"ignore": anchors that match them are neither positives nor background (Fast R-CNN dropped them
from training; detectron2 trains on them).

Sizes (docs/protocols.md §5, detectron2's VOC settings): a batch takes one shorter side s (training:
drawn from --train_sizes per batch; test: --test_size); each image is resized so that its
shorter side is s unless its longer side would pass L = min(max_size, 1.5·s), then placed
top-left on a zero canvas of ceil32(s) x ceil32(L) (transposed for portrait images; 1.5 covers
VOC's usual 4:3 and 3:2 frames). A training batch holds images of one orientation only
(detectron2 groups by aspect ratio too), so a run compiles one graph per (s, orientation).
The zero padding is black to the export, which normalises inside; detectron2 pads the
normalised image with zeros (the mean colour).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

from dc_core.errors import ConfigError
from eval import voc

MAX_ASPECT = 1.5
MULTIPLE = 32  # the coarsest backbone stride: the FPN adds maps upsampled by exactly 2
DIFFICULT_CLASS, PADDING_CLASS = -2.0, -1.0  # KerasHub's ignore and background values


@dataclasses.dataclass(frozen=True)
class DetectionImages:
    """Images of one or more VOC splits, in order: `images` (VOCImage), `sources` (per image its
    JPEG path, or for TFDS its encoded bytes, read once up front) and `missing`, the listed
    images that were absent."""
    name: str
    images: tuple
    sources: tuple
    missing: int

    def read(self, index: int) -> bytes:
        source = self.sources[index]
        if isinstance(source, bytes):
            return source
        with open(source, "rb") as f:
            return f.read()


def combine(splits: list) -> DetectionImages:
    """One DetectionImages of several voc.VOCSplit (e.g. VOC07 and VOC12 trainval)."""
    images, sources = [], []
    for split in splits:
        images += split.images
        if split.builder is None:
            sources += [image.path for image in split.images]
        else:
            encoded = dict(split.records().as_numpy_iterator())
            sources += [encoded[i] for i in range(len(split.images))]
    return DetectionImages(" + ".join(s.name for s in splits), tuple(images), tuple(sources),
                           sum(len(s.missing) for s in splits))


# ------------------------------------------------------------------------------ ground truth

def training_targets(images: DetectionImages) -> tuple:
    """(float32 [N, G, 4] boxes as pixel edges "xyxy", float32 [N, G] classes: the class index,
    DIFFICULT_CLASS, or PADDING_CLASS with box -1 beyond an image's objects)."""
    count = max([len(image.objects) for image in images.images] + [1])
    boxes = np.full((len(images.images), count, 4), -1.0, np.float32)
    labels = np.full((len(images.images), count), PADDING_CLASS, np.float32)
    for i, image in enumerate(images.images):
        for j, obj in enumerate(image.objects):
            xmin, ymin, xmax, ymax = obj.box
            boxes[i, j] = (xmin - 1, ymin - 1, xmax, ymax)
            labels[i, j] = DIFFICULT_CLASS if obj.difficult else voc.CLASSES.index(obj.name)
    return boxes, labels


def evaluation_truth(images: DetectionImages) -> list:
    """Per image (float [G, 4] VOC boxes, int [G] classes, bool [G] difficult), for
    metrics.voc_detection_map."""
    return [(np.array([obj.box for obj in image.objects], np.float64).reshape(-1, 4),
             np.array([voc.CLASSES.index(obj.name) for obj in image.objects], np.int64),
             np.array([obj.difficult for obj in image.objects], bool))
            for image in images.images]


def to_voc_boxes(boxes: np.ndarray, scale: np.ndarray, width: int, height: int) -> np.ndarray:
    """Detected pixel-edge boxes float [D, 4] of a resized image (scale (sy, sx)) -> VOC's
    inclusive 1-based boxes in the original width x height image."""
    boxes = np.asarray(boxes, np.float64) / [scale[1], scale[0], scale[1], scale[0]]
    boxes = np.clip(boxes, 0, [width, height, width, height])
    return boxes + [1, 1, 0, 0]


# ------------------------------------------------------------------------------ schedules

def _portrait(images: DetectionImages) -> np.ndarray:
    return np.array([image.height > image.width for image in images.images])


def training_schedule(images: DetectionImages, iterations: int, batch_size: int, sizes: tuple,
                      seed: int) -> tuple:
    """Which image, shorter side and flip each training example gets, batch after batch.

    Each epoch shuffles the images, cuts each orientation into batches of batch_size (the
    remainder waits for the next epoch's shuffle) and shuffles the batches; every batch draws
    one size. Returns int64 [iterations * batch_size] indices, float32 sizes, bool flips.
    """
    portrait = _portrait(images)
    if max((~portrait).sum(), portrait.sum()) < batch_size:
        raise ConfigError(f"--batch_size={batch_size}: {images.name} has only "
                          f"{(~portrait).sum()} landscape and {portrait.sum()} portrait "
                          "images, and a batch holds one orientation; lower --batch_size")
    rng = np.random.default_rng(seed)
    batches = []
    while len(batches) < iterations:
        order = rng.permutation(len(portrait))
        epoch = [group[i:i + batch_size]
                 for group in (order[~portrait[order]], order[portrait[order]])
                 for i in range(0, len(group) - batch_size + 1, batch_size)]
        batches += [epoch[i] for i in rng.permutation(len(epoch))]
    index = np.concatenate(batches[:iterations] + [np.zeros(0, np.int64)]).astype(np.int64)
    size = np.repeat(rng.choice(np.asarray(sizes, np.float32), iterations), batch_size)
    return index, size.astype(np.float32), rng.random(len(index)) < 0.5


def test_schedule(images: DetectionImages, size: int) -> tuple:
    """Every image once, landscape ones first (so few batches mix orientations), unflipped."""
    index = np.argsort(_portrait(images), kind="stable").astype(np.int64)
    return index, np.full(len(index), size, np.float32), np.zeros(len(index), bool)


# ------------------------------------------------------------------------------ batches

def _resize_plan(height, width, size, max_size: int):
    """(new height, new width, canvas height, canvas width) as int32 scalars."""
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    long_cap = tf.minimum(float(max_size), MAX_ASPECT * size)
    scale = tf.minimum(size / tf.minimum(height, width), long_cap / tf.maximum(height, width))
    new_h = tf.cast(tf.round(height * scale), tf.int32)
    new_w = tf.cast(tf.round(width * scale), tf.int32)
    short, long = (tf.cast(tf.math.ceil(v / MULTIPLE), tf.int32) * MULTIPLE
                   for v in (size, long_cap))
    portrait = height > width
    return (tf.maximum(new_h, 1), tf.maximum(new_w, 1), tf.where(portrait, long, short),
            tf.where(portrait, short, long))


def batches(images: DetectionImages, schedule: tuple, channels: int, max_size: int,
            batch_size: int, targets: tuple, drop_remainder: bool) -> tf.data.Dataset:
    """Batches of (int64 [B] indices, uint8 [B, H, W, C] canvases, float32 [B, 2] scales (sy,
    sx), float32 [B, G, 4] boxes and [B, G] classes as `training_targets`, resized and
    flipped with the image). Undecodable images are dropped (a batch may then mix canvases and
    is padded to the larger)."""
    index, size, flip = schedule
    all_boxes, all_labels = (tf.constant(t) for t in targets)

    def generate():
        for i, s, f in zip(index, size, flip):
            yield i, s, f, images.read(int(i))

    def load(i, s, f, encoded):
        image = voc.decode(encoded, channels)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        new_h, new_w, canvas_h, canvas_w = _resize_plan(height, width, s, max_size)
        x = tf.image.resize(image, [new_h, new_w], antialias=True)
        x = tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)
        scale = tf.cast(tf.stack([new_h / height, new_w / width]), tf.float32)
        boxes, labels = tf.gather(all_boxes, i), tf.gather(all_labels, i)
        scaled = boxes * tf.tile(scale[::-1], [2])
        if_flipped = tf.stack([tf.cast(new_w, tf.float32) - scaled[:, 2], scaled[:, 1],
                               tf.cast(new_w, tf.float32) - scaled[:, 0], scaled[:, 3]], 1)
        scaled = tf.where(f, if_flipped, scaled)
        x = tf.cond(f, lambda: tf.reverse(x, axis=[1]), lambda: x)
        boxes = tf.where((labels == PADDING_CLASS)[:, None], boxes, scaled)
        x = tf.image.pad_to_bounding_box(x, 0, 0, canvas_h, canvas_w)
        return i, x, scale, boxes, labels

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.float32),
                 tf.TensorSpec([], tf.bool), tf.TensorSpec([], tf.string))
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    return ds.padded_batch(batch_size, drop_remainder=drop_remainder).prefetch(2)


def ceil_multiple(value: float) -> int:
    """The smallest multiple of MULTIPLE >= value."""
    return int(math.ceil(value / MULTIPLE)) * MULTIPLE
