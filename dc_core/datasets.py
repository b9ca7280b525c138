"""Datasets by name: `open_source(--dataset value)` returns a `dc_core.sources.Source`.

`fashion_mnist[:train|test]` reads the IDX files of Debian's dataset-fashion-mnist (or a TFDS
copy), `folder:PATH` every image below PATH (one sub-folder per class gives labels), and
`tfds:NAME[:SPLIT]` a TFDS dataset already prepared in a data dir.
"""

import os

import numpy as np
from absl import logging

from dc_core.errors import ConfigError, DatasetNotFoundError
from dc_core.sources import (IMAGE_EXTENSIONS, ArraySource, FolderSource, Source, TFDSSource,
                             load_idx, refusal)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": "train", "test": "t10k"}
# Label i's name (Xiao et al. 2017, the data set's README).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


def open_source(dataset: str, data_dir: str = "", max_examples: int = 0) -> Source:
    """Opens the source named by a --dataset value.

    Args:
      dataset: `fashion_mnist[:train|test]`, `tfds:NAME[:SPLIT]` or `folder:PATH`.
      data_dir: Fashion-MNIST IDX folder or a TFDS data dir ("" = the default location).
      max_examples: keep only the first N examples (0 = all).
    """
    kind, _, rest = dataset.partition(":")
    if kind == "fashion_mnist":
        source = _fashion_mnist(rest or "train", data_dir, max_examples)
    elif kind == "folder" and rest:
        source = _folder(rest)
    elif kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return _tfds(dataset, name, split or "train", data_dir, max_examples)
    else:
        raise ConfigError(f"--dataset={dataset}: expected fashion_mnist[:SPLIT], tfds:NAME[:SPLIT] "
                         "or folder:PATH")
    return _first(source, max_examples)


def all_labels(source: Source) -> np.ndarray:
    """int64 [N] ground-truth labels; record sources are read once (without decoding) to get
    them. Raises ConfigError when the dataset has none."""
    labels = source.labels
    if labels is None:
        labels = np.full(source.num_examples, -1, np.int64)
        for index, _, label in source.triples().batch(4096).as_numpy_iterator():
            labels[index] = label
    if (labels < 0).all():
        raise ConfigError(f"--dataset={source.name} has no labels; --supervised needs them "
                          "(for folder:PATH, put the images in one sub-folder per class)")
    return labels


def _first(source: Source, n: int) -> Source:
    """The first n examples of a random-access source (n = 0: all)."""
    if not n or n >= source.num_examples:
        return source
    labels = None if source.labels is None else source.labels[:n]
    if isinstance(source, ArraySource):
        return ArraySource(source.name, n, source.channels, labels, images=source.images[:n],
                           class_names=source.class_names)
    return FolderSource(source.name, n, source.channels, labels, class_names=source.class_names,
                        root=source.root,
                        paths=source.paths[:n], refusals=source.refusals[:n])


def _fashion_mnist(split: str, data_dir: str, max_examples: int) -> Source:
    """The split from Debian's IDX files (only the first `max_examples` read; 0: all), else from
    a TFDS data dir."""
    if split not in _FASHION_FILES:
        raise ConfigError(f"--dataset=fashion_mnist:{split}: the splits are train and test")
    name = f"fashion_mnist:{split}" if split != "train" else "fashion_mnist"
    folder = data_dir or FASHION_MNIST_DIR
    prefix = os.path.join(folder, _FASHION_FILES[split])
    idx = [prefix + suffix for suffix in ("-images-idx3-ubyte", "-labels-idx1-ubyte")]
    found = [next((p for p in (f + ".gz", f) if os.path.exists(p)), None) for f in idx]
    if all(found):
        images, labels = (load_idx(path, max_examples) for path in found)
    elif data_dir and os.path.isdir(os.path.join(data_dir, "fashion_mnist")):
        import tensorflow_datasets as tfds
        data = tfds.as_numpy(tfds.load("fashion_mnist", split=split, data_dir=data_dir,
                                       batch_size=-1, download=False))
        images, labels = data["image"][..., 0], data["label"]
    else:
        raise DatasetNotFoundError(
            f"--dataset={name}: no Fashion-MNIST IDX files ({os.path.basename(idx[0])}.gz) in "
            f"{folder}{' and no TFDS fashion_mnist in it' if data_dir else ''}. Install Debian's "
            f"package (sudo apt-get install dataset-fashion-mnist, files in {FASHION_MNIST_DIR}) "
            "or point --data_dir at a folder with the IDX files or a TFDS data dir.")
    # Zero-pad 28x28 to 32x32 so three 2x2 pools of small_vgg divide evenly.
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
    return ArraySource(name, len(images), 1, labels.astype(np.int64), images=images,
                       class_names=FASHION_MNIST_CLASSES)


def _folder(root: str) -> Source:
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise DatasetNotFoundError(f"--dataset=folder:{root}: no such folder")
    paths, visited = [], {os.path.realpath(root)}
    for d, dirs, files in os.walk(root, followlinks=True):
        # Linked folders are followed, each real folder once: a symlink loop ends here.
        dirs.sort()
        real = [os.path.realpath(os.path.join(d, x)) for x in dirs]
        dirs[:] = [x for x, r in zip(dirs, real) if r not in visited and not visited.add(r)]
        paths += [os.path.relpath(os.path.join(d, f), root) for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    paths.sort()
    if not paths:
        raise DatasetNotFoundError(f"--dataset=folder:{root}: no image files "
                                   f"({', '.join(IMAGE_EXTENSIONS)}) below it")
    classes = [os.path.dirname(p).split(os.sep)[0] for p in paths]
    if all(classes):
        names = sorted(set(classes))
        lookup = {c: i for i, c in enumerate(names)}
        labels = np.array([lookup[c] for c in classes], np.int64)
    else:
        names, labels = None, None
    source = FolderSource(f"folder:{root}", len(paths), 3, labels,
                          class_names=None if names is None else tuple(names), root=root,
                          paths=tuple(paths),
                          refusals=tuple(refusal(os.path.join(root, p)) for p in paths))
    refused = [i for i, reason in enumerate(source.refusals) if reason]
    if refused:
        logging.warning("%d of the %d files below %s are not read (skipped like unreadable "
                        "images), e.g. %s", len(refused), len(paths), root,
                        "; ".join(f"{source.describe(i)}: {source.refusals[i]}"
                                  for i in refused[:5]))
    return source


def prepared_tfds_builder(name: str, data_dir: str):
    """TFDS's builder of dataset `name` in data_dir ("" = TFDS's default) when the dataset is
    prepared there, else None."""
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        return None
    return builder if builder.is_prepared() else None


def _tfds(dataset: str, name: str, split: str, data_dir: str, max_examples: int) -> Source:
    import tensorflow_datasets as tfds
    builder = prepared_tfds_builder(name, data_dir)
    if builder is None:
        raise DatasetNotFoundError(
            f"--dataset={dataset}: TFDS dataset {name!r} is not prepared in "
            f"--data_dir={data_dir or '(TFDS default)'}. Prepare it once on a machine that has "
            f"the data: `tfds build {name} --data_dir=DIR` (ImageNet: put the ILSVRC2012 tar "
            "files in DIR/downloads/manual first), then pass --data_dir=DIR.")
    if split.split("[")[0] not in builder.info.splits:
        raise ConfigError(f"--dataset={dataset}: split {split!r} not in "
                         f"{sorted(builder.info.splits)}")
    if max_examples:
        split = f"{split}[:{max_examples}]"
    features = builder.info.features
    image_key = "image" if "image" in features else next(
        k for k, v in features.items() if isinstance(v, tfds.features.Image))
    label_key = "label" if "label" in features else None
    channels = features[image_key].shape[-1] or 3
    names = getattr(features[label_key], "names", None) if label_key else None
    return TFDSSource(dataset, builder.info.splits[split].num_examples, channels, None,
                      random_access=False, class_names=tuple(names) if names else None,
                      builder=builder, split=split, image_key=image_key,
                      label_key=label_key)
