"""PASCAL VOC 2007 reader: per-image objects and 20-class labels, from a VOCdevkit or TFDS.

    split = voc.open_split("/data/VOCdevkit/VOC2007", "trainval")
    split = voc.open_split("tfds:voc/2007", "test", data_dir="/data/tfds")
    split.images[i].objects      # VOCObject(name, box, difficult, truncated), XML order
    split.labels()               # int8 [N, 20]: 1 present, 0 absent, -1 difficult only
    split.records(shuffle=True)  # tf.data of (index int64, encoded JPEG string)
    voc.image_batches(split, 3, view, 16)  # (indices, uint8 views) of the decodable images

The VOCdevkit layout (the folder given, or its VOC2007 / VOCdevkit/VOC2007 sub-folder):
JPEGImages/ID.jpg, Annotations/ID.xml, ImageSets/Main/SPLIT.txt (one ID a line) and the
per-class ImageSets/Main/CLASS_SPLIT.txt ("ID 1|-1|0"). An image listed in SPLIT.txt whose
JPEG or XML is absent is skipped and counted (`VOCSplit.missing`); an annotation that is not
well-formed VOC XML stops the run with its file name. TFDS `voc/2007` (`tfds build voc/2007
--data_dir=DIR`) has the same images: its train+validation splits are trainval; boxes are
turned back into pixels from its normalised ones.

Label of class c for an image (the official per-class files' semantics): 1 if some object of c
is not difficult, -1 if all its objects of c are difficult (VOC's 0, "ignore"), 0 if none.

Below the reader, what the VOC evaluations share: the image pipeline (`image_batches`,
`per_image`) and per-class APs as JSON and as a markdown table (`ap_dict`, `ap_table`).
"""

import dataclasses
import math
import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import tensorflow as tf
from absl import logging

from dc_core.datasets import prepared_tfds_builder
from dc_core.errors import ConfigError
from eval.features import Progress

CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
           "train", "tvmonitor")
PRESENT, ABSENT, DIFFICULT = 1, 0, -1
_TFDS_SPLITS = {"trainval": "train+validation", "train": "train", "val": "validation",
                "test": "test"}
HELP = "The VOCdevkit/VOC2007 folder (or VOCdevkit, or its parent), or tfds:voc/2007."


class VOCFormatError(ConfigError):
    """An annotation or image-set file is not in the VOC format; the message names the file."""


@dataclasses.dataclass(frozen=True)
class VOCObject:
    """One annotated object: class name, box (xmin, ymin, xmax, ymax) in VOC's 1-based
    inclusive pixels, and its difficult and truncated flags."""
    name: str
    box: tuple
    difficult: bool
    truncated: bool = False


@dataclasses.dataclass(frozen=True)
class VOCImage:
    """One image: its id, size, objects (a tuple of VOCObject) and JPEG path ("" for TFDS)."""
    image_id: str
    width: int
    height: int
    depth: int
    objects: tuple
    path: str = ""

    def label_row(self) -> np.ndarray:
        """int8 [20]: PRESENT, ABSENT or DIFFICULT (difficult objects only) per class."""
        row = np.full(len(CLASSES), ABSENT, np.int8)
        for obj in self.objects:
            c = CLASSES.index(obj.name)
            row[c] = PRESENT if not obj.difficult or row[c] == PRESENT else DIFFICULT
        return row


def parse_annotation(path: str, image_path: str = "") -> VOCImage:
    """Reads one Annotations/ID.xml file.

    Raises:
        VOCFormatError: the file is not XML, lacks size or an object's name, box or flags as
            integers, names a class outside CLASSES, or has a box outside the image.
    """
    image_id = os.path.splitext(os.path.basename(path))[0]
    try:
        root = ElementTree.parse(path).getroot()
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
        depth = int(size.findtext("depth") or 3)
        objects = []
        for element in root.iter("object"):
            name = element.findtext("name").strip()
            box = element.find("bndbox")
            coords = tuple(int(float(box.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
            if name not in CLASSES:
                raise ValueError(f"class {name!r} is not one of the 20 VOC classes")
            xmin, ymin, xmax, ymax = coords
            if not (1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height):
                raise ValueError(f"box {coords} lies outside the {width}x{height} image")
            objects.append(VOCObject(name, coords, element.findtext("difficult", "0").strip()
                                     == "1", element.findtext("truncated", "0").strip() == "1"))
    except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as e:
        # AttributeError/TypeError: a required element (size, name, bndbox, ...) is missing.
        raise VOCFormatError(f"{path} is not a valid VOC annotation ({type(e).__name__}: {e}); "
                             "fix or replace the file (the VOCdevkit's copy)") from e
    return VOCImage(image_id, width, height, depth, tuple(objects), image_path)


@dataclasses.dataclass(frozen=True)
class VOCSplit:
    """The readable images of one split, in image-set order.

    Attributes: name ("ROOT:SPLIT" or "tfds:voc/2007:SPLIT"); images, a tuple of VOCImage;
    missing, the listed ids without JPEG or XML (skipped); builder and tfds_split for TFDS.
    """
    name: str
    images: tuple
    missing: tuple = ()
    builder: object = None
    tfds_split: str = ""

    def labels(self) -> np.ndarray:
        """int8 [N, 20] labels (PRESENT / ABSENT / DIFFICULT)."""
        return np.stack([image.label_row() for image in self.images])

    def records(self, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
        """(index int64, encoded JPEG string) per image, in order or shuffled (each pass anew).

        A TFDS split is read in record order through a shuffle buffer of 2048 records.
        """
        if self.builder is None:
            paths = tf.constant([image.path for image in self.images])
            ds = tf.data.Dataset.range(len(self.images))
            if shuffle:
                ds = ds.shuffle(len(self.images), seed=seed, reshuffle_each_iteration=True)
            return ds.map(lambda i: (i, tf.io.read_file(tf.gather(paths, i))),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = _tfds_dataset(self.builder, self.tfds_split).map(lambda ex: ex["image"])
        ds = ds.enumerate()
        return ds.shuffle(2048, seed=seed, reshuffle_each_iteration=True) if shuffle else ds


def find_root(path: str) -> str:
    """The VOC2007 folder at or below `path` (PATH, PATH/VOC2007 or PATH/VOCdevkit/VOC2007)."""
    for root in (path, os.path.join(path, "VOC2007"), os.path.join(path, "VOCdevkit", "VOC2007")):
        if os.path.isdir(os.path.join(root, "ImageSets", "Main")):
            return root
    raise ConfigError(f"--voc={path}: no ImageSets/Main folder there nor in VOC2007/ or "
                      "VOCdevkit/VOC2007/ below it; pass the VOCdevkit/VOC2007 folder of the "
                      "extracted VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar")


def read_devkit(path: str, split: str) -> VOCSplit:
    """Reads ImageSets/Main/SPLIT.txt and the annotation of each listed image."""
    root = find_root(path)
    list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise ConfigError(f"--voc={path}: {list_file} does not exist; VOC2007 has trainval.txt "
                          "and test.txt (the test tar adds the latter)")
    with open(list_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    images, missing = [], []
    for image_id in ids:
        jpeg = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
        xml = os.path.join(root, "Annotations", f"{image_id}.xml")
        if os.path.isfile(jpeg) and os.path.isfile(xml):
            images.append(parse_annotation(xml, jpeg))
        else:
            missing.append(image_id)
    if missing:
        logging.warning("%s: %d of the %d images listed in %s have no JPEG or XML and are "
                        "skipped (first: %s)", root, len(missing), len(ids), list_file,
                        ", ".join(missing[:5]))
    if not images:
        raise ConfigError(f"--voc={path}: none of the {len(ids)} images listed in {list_file} "
                          "has both JPEGImages/ID.jpg and Annotations/ID.xml")
    return VOCSplit(f"{root}:{split}", tuple(images), tuple(missing))


def read_class_files(path: str, split: str, image_ids) -> np.ndarray:
    """int8 [N, 20] labels of `image_ids` from the per-class CLASS_SPLIT.txt files (VOC's 1 / -1
    / 0 mapped to PRESENT / ABSENT / DIFFICULT); ABSENT where an id is not listed."""
    root = find_root(path)
    rows = {image_id: i for i, image_id in enumerate(image_ids)}
    labels = np.full((len(rows), len(CLASSES)), ABSENT, np.int8)
    mapping = {1: PRESENT, -1: ABSENT, 0: DIFFICULT}
    for c, name in enumerate(CLASSES):
        class_file = os.path.join(root, "ImageSets", "Main", f"{name}_{split}.txt")
        with open(class_file) as f:
            for line_number, line in enumerate(f, 1):
                fields = line.split()
                if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
                    raise VOCFormatError(f"{class_file}:{line_number}: expected 'ID 1|-1|0', "
                                         f"got {line.strip()!r}")
                if fields[0] in rows:
                    labels[rows[fields[0]], c] = mapping[int(fields[1])]
    return labels


def _tfds_dataset(builder, split: str) -> tf.data.Dataset:
    import tensorflow_datasets as tfds  # only the TFDS path needs it
    return builder.as_dataset(split=split, shuffle_files=False,
                              decoders={"image": tfds.decode.SkipDecoding()})


def read_tfds(name: str, split: str, data_dir: str) -> VOCSplit:
    """Reads a prepared TFDS VOC split (`name` e.g. "voc/2007"); one pass over its records."""
    tfds_split = _TFDS_SPLITS.get(split, split)
    builder = prepared_tfds_builder(name, data_dir)
    if builder is None:
        raise ConfigError(f"--voc=tfds:{name}: not prepared in --data_dir="
                          f"{data_dir or '(TFDS default)'}; run `tfds build {name} "
                          "--data_dir=DIR` once, then pass --data_dir=DIR")
    names = builder.info.features["objects"]["label"].names
    images = []
    for index, ex in enumerate(_tfds_dataset(builder, tfds_split).as_numpy_iterator()):
        height, width, depth = (int(v) for v in tf.image.extract_jpeg_shape(ex["image"]))
        objects = ex["objects"]
        boxes = np.round(objects["bbox"] * [height, width, height, width]).astype(int)
        images.append(VOCImage(
            os.path.splitext(ex["image/filename"].decode())[0], width, height, depth,
            tuple(VOCObject(names[label], tuple(int(box[i]) for i in (1, 0, 3, 2)), bool(difficult),
                            bool(truncated))
                  for label, box, difficult, truncated in zip(
                      objects["label"], boxes, objects["is_difficult"], objects["is_truncated"]))))
    return VOCSplit(f"tfds:{name}:{split}", tuple(images), (), builder, tfds_split)


def open_split(voc: str, split: str, data_dir: str = "") -> VOCSplit:
    """A VOCdevkit folder, or `tfds:NAME` (e.g. tfds:voc/2007) prepared in `data_dir`."""
    if voc.startswith("tfds:"):
        return read_tfds(voc[len("tfds:"):], split, data_dir)
    return read_devkit(voc, split)


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 [H, W, channels] image of an encoded JPEG (grey for 1 channel, RGB for 3)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.rgb_to_grayscale(image) if channels == 1 else image
    image.set_shape([None, None, channels])
    return image



# ------------------------------------------------------------------------------ the evaluations

def image_batches(split: VOCSplit, channels: int, view, batch_size: int,
                  shuffle: bool = False, seed: int = 0, repeat: bool = False) -> tf.data.Dataset:
    """Batches of (int64 [B] image indices, uint8 [B, V, S, S, C] views); `view` maps a uint8
    [H, W, C] image to float [V, S, S, C]. Undecodable images are dropped (callers count them)."""
    def load(index, encoded):
        views = view(decode(encoded, channels))
        return index, tf.cast(tf.clip_by_value(tf.round(views), 0, 255), tf.uint8)
    ds = split.records(shuffle, seed)
    ds = (ds.repeat() if repeat else ds).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.ignore_errors().batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)


def per_image(split: VOCSplit, batches, compute, what: str) -> np.ndarray:
    """Rows of compute(uint8 views) placed by image index; NaN rows for undecodable images."""
    out, progress = None, Progress(what, len(split.images))
    for indices, images in batches:
        rows = compute(images)
        if out is None:
            out = np.full((len(split.images), rows.shape[1]), np.nan, np.float32)
        out[indices.numpy()] = rows
        progress.update(len(indices))
    if out is None:
        raise ConfigError(f"--voc: no image of {split.name} could be decoded")
    return out


def ap_dict(aps) -> dict:
    """{class: AP or None where undefined}, for JSON."""
    return {name: None if math.isnan(ap) else float(ap) for name, ap in zip(CLASSES, aps)}


def ap_table(title: str, ap: dict, mean_ap: float) -> str:
    """Markdown: `title`, then a row per class of its AP % (`ap` as ap_dict gives it) and mAP."""
    lines = [title, "", "| class | AP |", "|---|---|"]
    lines += [f"| {name} | " + ("-" if value is None else f"{100 * value:.1f}") + " |"
              for name, value in ap.items()]
    return "\n".join(lines + [f"| **mAP** | **{100 * mean_ap:.1f}** |"])
