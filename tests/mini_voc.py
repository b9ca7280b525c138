"""A miniature PASCAL VOC 2007 in the real VOCdevkit layout, learnable by a tiny network.

    import mini_voc
    voc_root = mini_voc.write_mini_voc(tmp_path)  # tmp_path/VOCdevkit/VOC2007

Every image (about 48 x 40 px JPEG on grey noise) holds one large object of its class, drawn as
a filled shape in the class's own colour: the 20 classes take 20 distinct colours from
{0, 128, 255}^3 (the greys left out) and one of three shapes (box, disc, triangle), so colour
alone tells them apart even at 32 px. Every third image adds a smaller second object of another
class, difficult in every other one of them (those images are "difficult only" for that class).
Written: JPEGImages/ID.jpg, Annotations/ID.xml (VOC's fields, 1-based inclusive boxes),
ImageSets/Main/{trainval,train,val,test}.txt and CLASS_{trainval,train,val,test}.txt with VOC's
1 (present) / -1 (absent) / 0 (difficult only) labels.
"""

import itertools
import os
import xml.etree.ElementTree as ElementTree

import numpy as np
from PIL import Image, ImageDraw

from eval.voc import CLASSES

COLOURS = [c for c in itertools.product((0, 128, 255), repeat=3) if len(set(c)) > 1][:20]
SHAPES = ("box", "disc", "triangle")


def _draw(draw: ImageDraw.ImageDraw, cls: int, box: tuple) -> None:
    shape, colour = SHAPES[cls % 3], COLOURS[cls]
    x0, y0, x1, y1 = (v - 1 for v in box)  # VOC boxes are 1-based
    if shape == "box":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "disc":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)


def _box(rng: np.random.Generator, width: int, height: int, fraction: tuple) -> tuple:
    """A random square-ish box, its side a fraction of the shorter image side; 1-based."""
    side = int(min(width, height) * rng.uniform(*fraction))
    x0, y0 = rng.integers(1, width - side + 1), rng.integers(1, height - side + 1)
    return int(x0), int(y0), int(x0 + side - 1), int(y0 + side - 1)


def _annotation(image_id: str, width: int, height: int, objects: list) -> ElementTree.Element:
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "VOC2007"
    ElementTree.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ElementTree.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", 3)):
        ElementTree.SubElement(size, key).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "0"
    for cls, box, difficult in objects:
        obj = ElementTree.SubElement(root, "object")
        for key, value in (("name", CLASSES[cls]), ("pose", "Unspecified"), ("truncated", "0"),
                           ("difficult", str(int(difficult)))):
            ElementTree.SubElement(obj, key).text = value
        bndbox = ElementTree.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ElementTree.SubElement(bndbox, key).text = str(value)
    return root


def _make_devkit(root) -> str:
    voc_root = os.path.join(str(root), "VOCdevkit", "VOC2007")
    for folder in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc_root, folder), exist_ok=True)
    return voc_root


def _write_image(voc_root: str, image_id: str, width: int, height: int, objects: list,
                 rng) -> np.ndarray:
    """Draws the objects on noise, writes the JPEG and its XML; returns the label row."""
    pixels = np.clip(rng.normal(110, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    for obj_cls, box, _ in objects:
        _draw(ImageDraw.Draw(image), obj_cls, box)
    image.save(os.path.join(voc_root, "JPEGImages", f"{image_id}.jpg"), quality=95)
    ElementTree.ElementTree(_annotation(image_id, width, height, objects)).write(
        os.path.join(voc_root, "Annotations", f"{image_id}.xml"))
    row = np.full(len(CLASSES), -1)
    for obj_cls, _, difficult in objects:
        row[obj_cls] = 1 if not difficult or row[obj_cls] == 1 else 0
    return row


def _write_image_sets(voc_root: str, splits: dict, labels: dict) -> None:
    """ImageSets/Main: the split lists (train / val alternate within trainval) and the
    per-class `<class>_<split>.txt` files with 1 / -1 / 0 (difficult only)."""
    splits["train"], splits["val"] = splits["trainval"][::2], splits["trainval"][1::2]
    main = os.path.join(voc_root, "ImageSets", "Main")
    for split, ids in splits.items():
        with open(os.path.join(main, f"{split}.txt"), "w") as f:
            f.write("".join(f"{image_id}\n" for image_id in ids))
        for c, name in enumerate(CLASSES):
            with open(os.path.join(main, f"{name}_{split}.txt"), "w") as f:
                f.write("".join(f"{image_id} {labels[image_id][c]:2d}\n" for image_id in ids))


def write_mini_voc(root, trainval_per_class: int = 4, test_per_class: int = 3,
                   seed: int = 0) -> str:
    """Writes ROOT/VOCdevkit/VOC2007 and returns that path.

    Args:
        root: the folder to write into.
        trainval_per_class, test_per_class: images whose main object is of each class; trainval
            is split alternately into train and val.
        seed: seeds the sizes, positions, noise and second objects.
    """
    voc_root = _make_devkit(root)
    rng = np.random.default_rng(seed)
    splits, labels, number = {"trainval": [], "test": []}, {}, 0
    for split, per_class in (("trainval", trainval_per_class), ("test", test_per_class)):
        for i in range(per_class * len(CLASSES)):
            number += 1
            image_id, cls = f"{number:06d}", i % len(CLASSES)
            width, height = int(rng.integers(44, 57)), int(rng.integers(36, 45))
            objects = [(cls, _box(rng, width, height, (0.6, 0.8)), False)]
            if i % 3 == 2:
                other = (cls + 1 + int(rng.integers(len(CLASSES) - 1))) % len(CLASSES)
                objects.append((other, _box(rng, width, height, (0.25, 0.35)), i % 6 == 5))
            splits[split].append(image_id)
            labels[image_id] = _write_image(voc_root, image_id, width, height, objects, rng)
    _write_image_sets(voc_root, splits, labels)
    return voc_root


def write_mini_voc_detection(root, num_classes: int = 3, trainval_images: int = 36,
                             test_images: int = 18, size: tuple = (64, 96),
                             seed: int = 0) -> str:
    """A miniature VOC2007 for detection; writes ROOT/VOCdevkit/VOC2007 and returns that path.

    Each image (width and height drawn from `size`, aspect at most 1.5) holds one or two
    non-overlapping objects of the first `num_classes` classes, their sides 40-60 % of the
    shorter image side, each drawn as `write_mini_voc` draws it; every fifth object is marked
    difficult. Written as `write_mini_voc` writes its files, with train / val alternating.
    """
    voc_root = _make_devkit(root)
    rng = np.random.default_rng(seed)
    splits, labels, number, objects_drawn = {"trainval": [], "test": []}, {}, 0, 0
    for split, count in (("trainval", trainval_images), ("test", test_images)):
        for _ in range(count):
            number += 1
            image_id = f"{number:06d}"
            width = int(rng.integers(*size, endpoint=True))
            height = int(np.clip(rng.integers(*size, endpoint=True), width / 1.5, width * 1.5))
            objects = []
            for _ in range(1 + int(rng.integers(2))):
                box = _box(rng, width, height, (0.4, 0.6))
                if all(box[0] > other[2] or box[2] < other[0] or box[1] > other[3]
                       or box[3] < other[1] for _, other, _ in objects):
                    objects_drawn += 1
                    objects.append((int(rng.integers(num_classes)), box, objects_drawn % 5 == 0))
            splits[split].append(image_id)
            labels[image_id] = _write_image(voc_root, image_id, width, height, objects, rng)
    _write_image_sets(voc_root, splits, labels)
    return voc_root


def prepare_tfds(root, data_dir: str) -> None:
    """Prepares TFDS voc/2007 in data_dir with TFDS's own builder from the miniature extracted
    at ROOT (written by one of the functions above), in place of the download of the tars."""
    import tensorflow_datasets as tfds
    builder = tfds.builder("voc/2007", data_dir=data_dir)

    class LocalFiles:
        """Stands in for the download of the two VOC tars: both are extracted at root."""
        downloaded_size = 0

        def download_and_extract(self, urls):
            return {key: str(root) for key in urls}

    builder._make_download_manager = lambda *args, **kwargs: LocalFiles()
    builder.download_and_prepare()  # TFDS's own VOC builder writes the records
