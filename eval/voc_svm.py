r"""PASCAL VOC 2007 SVM and low-shot SVM classification on an export's frozen features.

    python -m eval.voc_classification --model=runs/alexnet/export --voc=/data/VOCdevkit \
        --mode=svm --layer=fc7 --output=runs/alexnet/voc_svm.json    # or --mode=lowshot

The benchmark suites' protocol (docs/protocols.md §4), run by eval/voc_classification.py's
--mode=svm and --mode=lowshot (this module has no command line of its own):

Features: the centre crop of each image (shorter side resized to the export's default resize
size, then an S x S crop) through --layer (default fc7, else pool; a conv endpoint average-pooled
to about 9k values as eval/features.py does), L2-normalised. float32 [N, dim].

svm: per class a LinearSVC (squared hinge, class weight positive 2 : negative 1, max_iter 2000),
C from {1, 10, 100, 2^-4 ... 2^-19} (--costs) chosen by the mean AP of --cv_folds-fold (3)
cross-validation on trainval, refit on the whole of trainval. Difficult-only images are
negatives in training and left out of the test AP (metrics.voc_average_precision).

lowshot: per k in {1, 2, 4, 8, 16, 32, 64, 96} (--lowshot_k), --lowshot_samples (5) draws, each
seeded by (--seed, k, draw), of k positives and min(19k, all) negatives per class; an SVM for
every C on each draw, test mAP per draw. Per k the C of best mean test mAP over the draws is
kept (so an upper bound) and the mAP mean / min / max / std over the draws at that C reported.

The settings come as `SVMSettings`, which voc_classification.VOCConfig is (this module imports
nothing of voc_classification); the VOC image pipeline is eval/voc.py's.
"""

import time
from typing import Protocol

import numpy as np
import tensorflow as tf
from absl import logging
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from dc_core import transforms
from dc_core.errors import ConfigError
from eval import metrics, voc
from eval.features import ExportedBackbone

PROTOCOL_COSTS = (1.0, 10.0, 100.0) + tuple(2.0 ** -i for i in range(4, 20))
_SVM_MAX_ITER = 2000  # the benchmark suites' LinearSVC max_iter


class SVMSettings(Protocol):
    """The fields of voc_classification.VOCConfig (its flags) that the SVM modes read."""
    model: str
    mode: str
    layer: str
    batch_size: int
    costs: tuple
    cv_folds: int
    lowshot_k: tuple
    lowshot_samples: int
    seed: int


# ------------------------------------------------------------------------------ SVMs

def svm_features(backbone: ExportedBackbone, split: voc.VOCSplit, layer: str,
                 batch_size: int) -> np.ndarray:
    """float32 [N, dim] L2-normalised centre-crop features (NaN rows: undecodable images)."""
    size = backbone.image_size

    def view(image):
        return transforms.center_crop(image, transforms.default_resize_size(size), size)[None]
    x = voc.per_image(split, voc.image_batches(split, backbone.channels, view, batch_size),
                  lambda images: backbone.features(images, (layer,))[layer].numpy(),
                  f"{layer} features of {split.name}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)


def _svm(cost: float, seed: int) -> LinearSVC:
    return LinearSVC(C=cost, class_weight={1: 2.0, -1: 1.0}, loss="squared_hinge", dual=True,
                     max_iter=_SVM_MAX_ITER, random_state=seed)


def _targets(labels: np.ndarray) -> np.ndarray:
    """SVM targets of int8 [N] VOC labels: +1 present, -1 absent or difficult only."""
    return np.where(labels == voc.PRESENT, 1, -1)


def check_positives(split: voc.VOCSplit, cfg: SVMSettings) -> None:
    """Fails unless every class has the positives that svm's folds or lowshot's largest k need."""
    needed, flag = ((cfg.cv_folds, "cv_folds") if cfg.mode == "svm"
                    else (max(cfg.lowshot_k), "lowshot_k"))
    counts = (split.labels() == voc.PRESENT).sum(0)
    short = [f"{name} ({n})" for name, n in zip(voc.CLASSES, counts) if n < needed]
    if short:
        raise ConfigError(f"--{flag} needs {needed} positive images per class in {split.name}; "
                          f"these have fewer: {', '.join(short)}. Lower --{flag} or use "
                          "a larger training split")


def train_svms(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray,
               costs: tuple, cv_folds: int, seed: int) -> tuple:
    """One SVM per class, C by cross-validated AP.

    Args:
        train_x: float32 [N, dim] features; train_labels: int8 [N, 20] VOC labels.
        test_x: float32 [M, dim] features.
        costs: the C values tried; cv_folds: folds of the cross-validation; seed: LinearSVC's.

    Returns:
        (float32 [M, 20] test scores, the C chosen per class, float [20, len(costs)]
        cross-validated AP).
    """
    scores = np.zeros((len(test_x), len(voc.CLASSES)), np.float32)
    cv_ap = np.zeros((len(voc.CLASSES), len(costs)))
    chosen = []
    for c, name in enumerate(voc.CLASSES):
        y = _targets(train_labels[:, c])
        for j, cost in enumerate(costs):
            cv_ap[c, j] = np.mean(cross_val_score(_svm(cost, seed), train_x, y, cv=cv_folds,
                                                  scoring="average_precision"))
        chosen.append(costs[int(np.nanargmax(cv_ap[c]))])
        scores[:, c] = _svm(chosen[-1], seed).fit(train_x, y).decision_function(test_x)
        logging.info("%s: C=%g, cross-validated AP %.4f", name, chosen[-1], np.nanmax(cv_ap[c]))
    return scores, chosen, cv_ap


def low_shot(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray,
             test_labels: np.ndarray, costs: tuple, ks: tuple, samples: int, seed: int) -> list:
    """Low-shot SVMs; one record per k: the chosen C and mAP mean/min/max/std over the draws.

    Args:
        train_x, test_x: float32 [N, dim] and [M, dim] features.
        train_labels, test_labels: int8 [N, 20] and [M, 20] VOC labels.
        costs: the C values tried; ks: positives per class; samples: draws per k; seed: of the
            draws (with k and the draw number) and of LinearSVC.
    """
    records = []
    for k in ks:
        aps = np.zeros((samples, len(costs), len(voc.CLASSES)))
        for sample in range(samples):
            rng = np.random.default_rng([seed, k, sample])
            for c in range(len(voc.CLASSES)):
                y = _targets(train_labels[:, c])
                negatives = np.flatnonzero(y < 0)
                rows = np.concatenate([
                    rng.choice(np.flatnonzero(y > 0), k, replace=False),
                    rng.choice(negatives, min(19 * k, len(negatives)), replace=False)])
                for j, cost in enumerate(costs):
                    svm = _svm(cost, seed).fit(train_x[rows], y[rows])
                    aps[sample, j, c] = metrics.voc_average_precision(
                        svm.decision_function(test_x), test_labels[:, c])
        maps = np.nanmean(aps, axis=2)  # [samples, costs]
        best = int(np.argmax(maps.mean(0)))
        records.append({
            "k": k, "cost": costs[best], "map_mean": float(maps[:, best].mean()),
            "map_min": float(maps[:, best].min()), "map_max": float(maps[:, best].max()),
            "map_std": float(maps[:, best].std()), "maps": maps[:, best].tolist(),
            "ap_mean": voc.ap_dict(np.nanmean(aps[:, best], axis=0))})
        logging.info("low-shot k=%d: C=%g, mAP %.4f ± %.4f", k, records[-1]["cost"],
                     records[-1]["map_mean"], records[-1]["map_std"])
    return records


def svm_evaluation(cfg: SVMSettings, train: voc.VOCSplit, test: voc.VOCSplit,
                   writer) -> tuple:
    """SVMs or low-shot SVMs on the export's features (low-shot mAPs also to `writer`); returns
    (test scores [N, 20] or None for lowshot, record)."""
    backbone = ExportedBackbone(cfg.model)
    shapes = backbone.shapes
    layer = cfg.layer or ("fc7" if "fc7" in shapes else "pool" if "pool" in shapes
                          else list(shapes)[-1])
    backbone.require([layer], "layer")
    train_x = svm_features(backbone, train, layer, cfg.batch_size)
    test_x = svm_features(backbone, test, layer, cfg.batch_size)
    start = time.time()
    seen, test_seen = ~np.isnan(train_x[:, 0]), ~np.isnan(test_x[:, 0])
    train_x, train_labels = train_x[seen], train.labels()[seen]
    record = {"layer": layer, "dim": int(train_x.shape[1]),
              "undecodable_train_images": int((~seen).sum())}
    scores = None
    if cfg.mode == "svm":
        scores = np.full((len(test_x), len(voc.CLASSES)), np.nan, np.float32)
        scores[test_seen], chosen, cv_ap = train_svms(
            train_x, train_labels, test_x[test_seen], cfg.costs, cfg.cv_folds, cfg.seed)
        record.update(costs=dict(zip(voc.CLASSES, chosen)), cv_ap=cv_ap.tolist())
    else:
        record["lowshot"] = low_shot(train_x, train_labels, test_x[test_seen],
                                     test.labels()[test_seen], cfg.costs, cfg.lowshot_k,
                                     cfg.lowshot_samples, cfg.seed)
        record["undecodable_test_images"] = int((~test_seen).sum())
    record["svm_s"] = time.time() - start
    with writer.as_default():
        for row in record.get("lowshot", []):
            tf.summary.scalar("lowshot/map_mean", row["map_mean"], step=row["k"])
    return scores, record


def lowshot_table(report: dict, title: str) -> str:
    """Markdown: the mAP % per k of a lowshot report."""
    lines = [title + ", mAP % over the draws at the best C", "",
             "| k | C | mean | min | max | std |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['k']} | {r['cost']:g} | " + " | ".join(
        f"{100 * r[key]:.1f}" for key in ("map_mean", "map_min", "map_max", "map_std"))
        + " |" for r in report["lowshot"]]
    return "\n".join(lines)
