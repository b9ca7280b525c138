"""How healthy the features of exports are: kNN accuracy, dead units and effective rank per layer.

A quick look (a minute per export on 2 cores) at what the probe of bench/RESULTS.md §3 measures
in five: the weighted kNN-20 of eval.linear_probe on the first --train images of Fashion-MNIST's
train split against the first --test of its test split (both centre crops, through the export's
serving signature), plus, per layer, the share of units that never fire on the train images and
the effective rank (exp of the entropy of the covariance's eigenvalue shares) of their features,
and with --whiten=D the kNN once more after PCA-whitening the features to D components (fitted
on the train images; DeepCluster's own preprocessing before k-means): what the features hold
when every direction counts alike, against what a plain cosine sees.
The kNN figures are below the full probe's (fewer neighbours to draw from), so compare exports
with each other, not with bench/RESULTS.md §3.

    python bench/feature_health.py --export=runs/fashion_mnist_v2/export \
        --export=runs/fashion_mnist_random/export

Prints one JSON object per export and layer.
"""

import json

import numpy as np
import tensorflow as tf
from absl import app, flags

from dc_tf import data
from dc_tf.data import pipelines
from dc_core.clustering import fit_pca_whitening
from eval.linear_probe import knn_scores

flags.DEFINE_multi_string("export", [], "SavedModel folders to look at.")
flags.DEFINE_list("layers", ["fc6", "fc7", "embedding"], "Endpoints (those an export lacks are "
                  "left out).")
flags.DEFINE_integer("train", 15000, "Training images the kNN searches.")
flags.DEFINE_integer("test", 5000, "Test images it classifies.")
flags.DEFINE_integer("whiten", 0, "Also the kNN after PCA-whitening to this many components "
                     "(at most the layer's width; 0: not).")
FLAGS = flags.FLAGS


def _features(serving, dataset: str, n: int, layers: list) -> tuple:
    source = data.open_source(dataset, "", n)
    found, labels = {name: [] for name in layers}, []
    for images, _, batch_labels in pipelines.feature_dataset(source, 32, 32, 1000):
        out = serving(images=tf.cast(images, tf.uint8))
        for name in layers:
            found[name].append(out[name].numpy().reshape(len(batch_labels), -1))
        labels.append(batch_labels.numpy())
    return {name: np.concatenate(rows) for name, rows in found.items()}, np.concatenate(labels)


def effective_rank(x: np.ndarray) -> float:
    shares = np.clip(np.linalg.eigvalsh(np.cov(x.T.astype(np.float64))), 0, None)
    shares = shares[shares > 0] / shares.sum()
    return float(np.exp(-(shares * np.log(shares)).sum()))


def main(argv):
    del argv
    for export in FLAGS.export:
        serving = tf.saved_model.load(export).signatures["serving_default"]
        layers = [name for name in FLAGS.layers if name in serving.structured_outputs]
        train, train_labels = _features(serving, "fashion_mnist", FLAGS.train, layers)
        test, test_labels = _features(serving, "fashion_mnist:test", FLAGS.test, layers)
        for name in layers:
            row = {"export": export, "layer": name,
                   "knn_top1": _knn_top1(train[name], train_labels, test[name], test_labels),
                   "dead_units": round(float((train[name].max(0) <= 0).mean()), 3),
                   "effective_rank": round(effective_rank(train[name]), 1)}
            if FLAGS.whiten:
                # eps relative to the total variance: dead units' zero directions stay at ~0.
                pca = fit_pca_whitening(train[name], min(FLAGS.whiten, train[name].shape[1]),
                                        eps=1e-5 * float(train[name].var(0).sum()))
                row["knn_top1_whitened"] = _knn_top1(pca.apply(train[name]), train_labels,
                                                     pca.apply(test[name]), test_labels)
            print(json.dumps(row), flush=True)


def _knn_top1(train, train_labels, test, test_labels) -> float:
    votes = knn_scores(train, train_labels, test, 20, 0.07, 10)
    return round(float((votes.argmax(1) == test_labels).mean()), 4)


if __name__ == "__main__":
    app.run(main)
