"""What splits the classes in the k-means clusters of a probe: simple image factors, per model.

eval.linear_probe writes every test image's label and k-means cluster into its JSON
(`per_image`). A clustering that follows the classes leaves nothing within a class to explain;
one that cuts a class in two cuts it along something. For each model of the JSON this prints,
per factor of the image, the share of that factor's within-class variance that the clusters
explain (eta squared, pooled over the classes: sum over classes and clusters of
size * (cluster mean - class mean)^2, over the sum of squared deviations from the class means):
0 when every cluster of a class has the class's mean value of the factor, 1 when the clusters
of a class sort its images by the factor exactly. The factors, on the test images as the
probe reads them (zero-padded to 32 x 32, pixels in 0..255, foreground: pixels over 20):

- `brightness`: the mean pixel;
- `area`: the share of foreground pixels;
- `width`, `height`: the extent of the foreground, in pixels;
- `foreground`: the mean of the foreground pixels;
- `texture`: the mean absolute difference of horizontally neighbouring pixels;
- `asymmetry`: (left half - right half) / all, of the pixel sums (which way a shoe points).

    python -m eval.linear_probe --dataset=fashion_mnist --output=/tmp/probe.json \
        --model=runs/fashion_mnist_v2/export --name=v2
    python bench/cluster_factors.py --probe=/tmp/probe.json

Prints one JSON object per model.
"""

import json

import numpy as np
import tensorflow as tf
from absl import app, flags

from dc_tf import data
from dc_tf.data import pipelines
from pipelines.report import per_image

flags.DEFINE_string("probe", None, "JSON written by eval.linear_probe.", required=True)
flags.DEFINE_string("dataset", "fashion_mnist:test", "The probe's test split (single-channel).")
FLAGS = flags.FLAGS

FOREGROUND = 20  # pixel value over which a pixel counts as the object's


def _test_images(dataset: str) -> tuple:
    """(float32 [n, 32, 32] images, int [n] labels) in the source's order, the probe's."""
    source = data.open_source(dataset, "", 0)
    images, labels = [], []
    for batch, _, batch_labels in pipelines.feature_dataset(source, 32, 32, 1000):
        if batch.shape[-1] != 1:
            raise app.UsageError(f"--dataset={dataset} has {batch.shape[-1]} channels; the "
                                 "factors are defined on single-channel images")
        images.append(tf.cast(batch[..., 0], tf.float32).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _extent(mask: np.ndarray) -> np.ndarray:
    """int [n] span in pixels of the True entries of bool [n, s] rows (0 for none)."""
    any_ = mask.any(axis=1)
    first = mask.argmax(axis=1)
    last = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
    return np.where(any_, last - first, 0)


def factors(images: np.ndarray) -> dict:
    """{factor name: float [n]} of float [n, s, s] images in 0..255."""
    mask = images > FOREGROUND
    half = images.shape[2] // 2
    total = images.sum(axis=(1, 2))
    return {
        "brightness": images.mean(axis=(1, 2)),
        "area": mask.mean(axis=(1, 2)),
        "width": _extent(mask.any(axis=1)),
        "height": _extent(mask.any(axis=2)),
        "foreground": (images * mask).sum(axis=(1, 2)) / np.maximum(mask.sum(axis=(1, 2)), 1),
        "texture": np.abs(np.diff(images, axis=2)).mean(axis=(1, 2)),
        "asymmetry": (images[:, :, :half].sum(axis=(1, 2)) - images[:, :, half:].sum(axis=(1, 2)))
                     / np.maximum(total, 1.0),
    }


def within_class_eta2(values: np.ndarray, labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of the within-class variance of `values` that the clusters explain (pooled)."""
    explained = total = 0.0
    for c in np.unique(labels):
        v, k = values[labels == c].astype(np.float64), clusters[labels == c]
        total += float(((v - v.mean()) ** 2).sum())
        for cluster in np.unique(k):
            part = v[k == cluster]
            explained += len(part) * float((part.mean() - v.mean()) ** 2)
    return explained / total if total else 0.0


def main(argv):
    del argv
    with open(FLAGS.probe) as f:
        report = json.load(f)
    images, labels = _test_images(FLAGS.dataset)
    per_factor = factors(images)
    for model in report["models"]:
        (model_labels, clusters), _ = per_image(report, model["name"], "nmi")
        if not np.array_equal(model_labels, labels):
            raise app.UsageError(f"{FLAGS.probe}: its test labels are not those of "
                                 f"--dataset={FLAGS.dataset} in order; give the probe's split")
        print(json.dumps({"model": model["name"], **{
            name: round(within_class_eta2(v, labels, clusters), 3)
            for name, v in per_factor.items()}}), flush=True)


if __name__ == "__main__":
    app.run(main)
