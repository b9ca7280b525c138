"""Scores shared by the evaluations: numpy arrays in, Python floats or numpy arrays out.

Sections:
  Classification   top-k hits and accuracy of class scores.
  VOC AP           per-class average precision of multi-label scores, difficult excluded; mAP.
  VOC detection    per-class AP@0.5 of boxes (11-point VOC07 or area), difficult ignored; mAP.
  kNN              the cosine-weighted vote of a k-nearest-neighbour classifier.
  Clustering       NMI, ARI and clustering accuracy (Hungarian matching) against labels.
  Retrieval        Oxford/Paris AP (classic, revisited Easy/Medium/Hard) and mP@k.
  Bootstrap        confidence intervals of any of these over the test examples.

No TensorFlow and no FAISS here: the programs search and extract, these functions score.
"""

from typing import Callable

import numpy as np
import scipy.optimize
import scipy.stats
import sklearn.metrics

from dc_core.clustering.stats import nmi

__all__ = ["adjusted_rand_index", "bootstrap_interval", "clustering_accuracy",
           "half_sample_interval", "knn_class_scores", "nmi", "top_k_accuracy", "top_k_hits",
           "voc_average_precision", "voc_mean_average_precision", "voc_box_iou",
           "voc_detection_average_precision", "voc_detection_map", "classic_retrieval_map",
           "retrieval_average_precision", "retrieval_map", "revisited_retrieval_map"]


# ------------------------------------------------------------------------------ classification

def top_k_hits(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each example's label is among its k highest-scoring classes.

    Ties are broken towards the lower class index (a stable sort of the negated scores), so the
    result is deterministic.

    Args:
        scores: float [N, C] logits, probabilities or votes.
        labels: int [N] true classes in [0, C).
        k: 1 <= k; k >= C counts every example as correct.

    Returns:
        bool [N].
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [N, C] and labels [N]; got {scores.shape} and "
                         f"{labels.shape}")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got "
                         f"[{labels.min()}, {labels.max()}]")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.any(top == labels[:, None], axis=1)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among their k highest-scoring classes (`top_k_hits`).

    Returns:
        Accuracy in [0, 1].
    """
    return float(np.mean(top_k_hits(scores, labels, k)))


# ------------------------------------------------------------------------------ VOC AP
# Labels as eval/voc.py writes them: 1 present, 0 absent, -1 difficult only (not scored).

def voc_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated average precision of one class, difficult-only images left out.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct scores from high to low, with precision
    P_n and recall R_n of the images scoring at least the n-th (scikit-learn's
    average_precision_score, the protocol's AP). Tied scores enter as one threshold, so their
    order does not matter: [0.9, 0.5, 0.5] with labels [1, 0, 1] gives 1/2·1 + 1/2·2/3.
    deepcluster's eval_voc_classif.py subtracted 1e-5·label from each score, which breaks ties
    against the positives; that is not done here.

    Args:
        scores: float [N] class scores (logits or sums of logits).
        labels: int [N] in {1, 0, -1}.

    Returns:
        AP in [0, 1]; NaN when no image is a positive, for AP is undefined then.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [N]; got {scores.shape} and "
                         f"{labels.shape}")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError(f"labels must be 1 (present), 0 (absent) or -1 (difficult), got "
                         f"{sorted(set(labels.tolist()) - {-1, 0, 1})[:5]}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    scored = labels >= 0
    if not (labels[scored] == 1).any():
        return float("nan")
    return float(sklearn.metrics.average_precision_score(labels[scored] == 1, scores[scored]))


def voc_mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple:
    """Per-class AP and their mean (VOC classification mAP).

    Args:
        scores: float [N, C].
        labels: int [N, C] in {1, 0, -1}.

    Returns:
        (float64 [C] APs, NaN for a class without positives; mAP, the mean over the classes
        that have an AP, NaN if none has).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [N, C]; got {scores.shape} and "
                         f"{labels.shape}")
    aps = np.array([voc_average_precision(scores[:, c], labels[:, c])
                    for c in range(scores.shape[1])])
    defined = aps[~np.isnan(aps)]
    return aps, float(defined.mean()) if defined.size else float("nan")


# ------------------------------------------------------------------------------ VOC detection
# docs/protocols.md §5, as the VOCdevkit's VOCevaldet.m scores detections. Boxes are VOC's inclusive
# pixels [xmin, ymin, xmax, ymax]: a box covers (xmax - xmin + 1) x (ymax - ymin + 1) pixels.

def voc_box_iou(boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of float [D, 4] and [G, 4] boxes (inclusive, +1), float64 [D, G]."""
    a, b = np.asarray(boxes, np.float64)[:, None], np.asarray(gt_boxes, np.float64)[None]
    width = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0)
    height = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1,
                        0)
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return width * height / (area_a + area_b - width * height)


def voc_detection_average_precision(image_ids: np.ndarray, scores: np.ndarray,
                                    boxes: np.ndarray, ground_truth: list,
                                    iou_threshold: float = 0.5,
                                    interpolation: str = "11point") -> float:
    """Average precision of one class's detections (VOC07: IoU >= 0.5, 11-point).

    Detections are taken by decreasing score (ties in input order). Each is matched to the
    object of its image with the highest IoU; if that IoU >= iou_threshold (VOCevaldet.m's
    `ovmax >= minoverlap`; the Python ports test `>`), it is a true positive when the object is
    not difficult and not yet claimed, a false positive when already claimed (a duplicate), and
    ignored (neither) when the object is difficult; below the threshold it is a false positive.
    Recall counts the non-difficult objects. "11point": AP = mean over t in {0, 0.1, ..., 1} of
    the highest precision at recall >= t (0 where recall never reaches t); "area" (VOC2010+):
    the area under the precision envelope (precision made non-increasing in recall).

    Args:
        image_ids: int [D] the image of each detection, an index into `ground_truth`.
        scores: float [D] confidences.
        boxes: float [D, 4] detected boxes, inclusive pixels.
        ground_truth: per image a pair (float [G, 4] boxes, bool [G] difficult) of the objects
            of this class (G may be 0).
        iou_threshold: the overlap a true positive needs.
        interpolation: "11point" or "area".

    Returns:
        AP in [0, 1]; NaN when no object of the class is non-difficult (0 with no detections).
    """
    image_ids = np.asarray(image_ids, np.int64)
    scores, boxes = np.asarray(scores, np.float64), np.asarray(boxes, np.float64).reshape(-1, 4)
    if image_ids.shape != scores.shape or scores.shape != boxes.shape[:1]:
        raise ValueError(f"image_ids [D], scores [D] and boxes [D, 4] disagree: "
                         f"{image_ids.shape}, {scores.shape}, {boxes.shape}")
    if image_ids.size and (image_ids.min() < 0 or image_ids.max() >= len(ground_truth)):
        raise ValueError(f"image_ids must index the {len(ground_truth)} ground-truth images")
    if interpolation not in ("11point", "area"):
        raise ValueError(f"interpolation={interpolation!r}: choose '11point' or 'area'")
    difficult = [np.asarray(d, bool) for _, d in ground_truth]
    positives = sum(int((~d).sum()) for d in difficult)
    if positives == 0:
        return float("nan")
    claimed = [np.zeros(d.shape, bool) for d in difficult]
    outcome = np.zeros(len(scores))  # by rank: 1 true positive, -1 false positive, 0 ignored
    for rank, k in enumerate(np.argsort(-scores, kind="stable")):
        image = image_ids[k]
        gt_boxes = np.asarray(ground_truth[image][0], np.float64).reshape(-1, 4)
        overlaps = voc_box_iou(boxes[k:k + 1], gt_boxes)[0]
        j = int(np.argmax(overlaps)) if overlaps.size else -1
        if j < 0 or overlaps[j] < iou_threshold:
            outcome[rank] = -1
        elif not difficult[image][j]:
            outcome[rank] = -1 if claimed[image][j] else 1
            claimed[image][j] = True
    outcome = outcome[outcome != 0]
    true_positives = np.cumsum(outcome == 1)
    recall = true_positives / positives
    precision = true_positives / np.arange(1, len(outcome) + 1)
    if interpolation == "11point":
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def voc_detection_map(detections: list, ground_truth: list, num_classes: int,
                      iou_threshold: float = 0.5, interpolation: str = "11point") -> tuple:
    """Per-class detection AP (`voc_detection_average_precision`) and their mean.

    Args:
        detections: per image a triple (float [D, 4] boxes, float [D] scores, int [D] classes).
        ground_truth: per image a triple (float [G, 4] boxes, int [G] classes, bool [G]
            difficult), in the same image order.
        num_classes: C; classes lie in [0, C).
        iou_threshold, interpolation: as `voc_detection_average_precision`.

    Returns:
        (float64 [C] APs, NaN for a class without non-difficult objects; mAP over the classes
        that have an AP, NaN if none has).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections for {len(ground_truth)} of "
                         "ground truth; give both for the same images")
    det = [tuple(np.asarray(v) for v in d) for d in detections]
    gt = [tuple(np.asarray(v) for v in g) for g in ground_truth]
    aps = np.full(num_classes, np.nan)
    for c in range(num_classes):
        picked = [np.asarray(classes) == c for _, _, classes in det]
        aps[c] = voc_detection_average_precision(
            np.concatenate([np.full(p.sum(), i) for i, p in enumerate(picked)] + [[]]),
            np.concatenate([d[1][p] for d, p in zip(det, picked)] + [[]]),
            np.concatenate([d[0].reshape(-1, 4)[p] for d, p in zip(det, picked)]
                           + [np.zeros((0, 4))]),
            [(g[0].reshape(-1, 4)[g[1] == c], g[2][g[1] == c]) for g in gt],
            iou_threshold, interpolation)
    defined = aps[~np.isnan(aps)]
    return aps, float(defined.mean()) if defined.size else float("nan")


# ------------------------------------------------------------------------------ kNN

def knn_class_scores(similarities: np.ndarray, neighbor_labels: np.ndarray, num_classes: int,
                     temperature: float) -> np.ndarray:
    """Class votes of a weighted kNN classifier (Wu et al. 2018 InstDisc; DINO's eval_knn).

    Each of the k neighbours votes for its class with weight exp(similarity / temperature); the
    predicted class is the argmax of the summed votes. With cosine similarities in [-1, 1] and
    temperature 0.07 the nearest neighbours dominate without the others being ignored.

    Args:
        similarities: float [M, k] cosine similarity of each query to its k neighbours.
        neighbor_labels: int [M, k] class of each neighbour, in [0, num_classes).
        num_classes: C.
        temperature: > 0.

    Returns:
        float64 [M, C] summed weights per class.
    """
    similarities = np.asarray(similarities, np.float64)
    neighbor_labels = np.asarray(neighbor_labels)
    if similarities.ndim != 2 or neighbor_labels.shape != similarities.shape:
        raise ValueError(f"similarities and neighbor_labels must both be [M, k]; got "
                         f"{similarities.shape} and {neighbor_labels.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if neighbor_labels.size and (neighbor_labels.min() < 0
                                 or neighbor_labels.max() >= num_classes):
        raise ValueError(f"neighbour labels must lie in [0, {num_classes})")
    votes = np.zeros((similarities.shape[0], num_classes))
    rows = np.repeat(np.arange(similarities.shape[0]), similarities.shape[1])
    np.add.at(votes, (rows, neighbor_labels.ravel()), np.exp(similarities / temperature).ravel())
    return votes


# ------------------------------------------------------------------------------ retrieval
# The Oxford/Paris evaluation (docs/protocols.md §6), as the revisited benchmark's compute_map
# (cirtorch utils/evaluate.py): a ranking lists database indices, best first; positives are
# scored, ignored images (junk; for Easy also hard, for Hard also easy) are removed from it.

def retrieval_average_precision(ranking: np.ndarray, positives, ignored=()) -> float:
    """Average precision of one ranking, as the Oxford compute_ap: trapezoids under the
    precision-recall curve, over the ranking with the ignored images taken out.

    Each positive found at 0-based position r, after the k ignored images ranked above it are
    removed, is the (j+1)-th positive at rank r' = r - k; it adds the trapezoid
    (1/n)·(p0 + p1)/2 with p0 = j / r' (1 when r' = 0) and p1 = (j + 1) / (r' + 1), n the number
    of positives listed (a listed positive missing from the ranking is never recalled).
    An image listed both as positive and ignored counts as positive.

    Args:
        ranking: int [N] database indices, best first.
        positives: int [P] indices of the relevant images.
        ignored: int indices of images that neither help nor hurt.

    Returns:
        AP in [0, 1]; NaN when `positives` is empty.
    """
    return float(_retrieval_scores(ranking, positives, ignored, ())[0])


def _retrieval_scores(ranking, positives, ignored, kappas) -> np.ndarray:
    """[AP, mP@k for k in kappas] of one query; NaN when it has no positive."""
    positives = np.unique(np.asarray(positives, np.int64))
    if positives.size == 0:
        return np.full(1 + len(kappas), np.nan)
    ranking = np.asarray(ranking)
    if ranking.ndim != 1:
        raise ValueError(f"a ranking must be 1-D database indices, got shape {ranking.shape}")
    found = np.flatnonzero(np.isin(ranking, positives))
    junk = np.flatnonzero(np.isin(ranking, ignored) & ~np.isin(ranking, positives))
    ranks = found - np.searchsorted(junk, found)  # ignored images above each positive removed
    if ranks.size == 0:
        return np.zeros(1 + len(kappas))
    j = np.arange(ranks.size)
    before = np.divide(j, ranks, out=np.ones(ranks.size), where=ranks > 0)
    ap = np.sum((before + (j + 1) / (ranks + 1)) / 2) / positives.size
    # cirtorch's mP@k: precision within the first min(k, rank of the last positive) places, so a
    # query with fewer than k positives can still reach 1.
    cut = [min(ranks[-1] + 1, k) for k in kappas]
    return np.array([ap] + [np.sum(ranks < c) / c for c in cut])


def retrieval_map(ranks: np.ndarray, positives: list, ignored: list,
                  kappas: tuple = ()) -> dict:
    """Mean AP and mean precision at k over queries; queries without positives are skipped.

    Args:
        ranks: int [Q, N] one ranking of database indices per query, best first.
        positives: Q int arrays of relevant indices.
        ignored: Q int arrays of ignored indices.
        kappas: the k of mP@k (each >= 1).

    Returns:
        {"map": float, "aps": float [Q] (NaN where skipped), "mp@k": float for each k,
         "skipped": number of queries without positives}; means are NaN if all are skipped.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not len(positives) == len(ignored) == ranks.shape[0]:
        raise ValueError(f"expected ranks [Q, N] and Q positive and ignored lists; got ranks "
                         f"{ranks.shape}, {len(positives)} and {len(ignored)} lists")
    if any(k < 1 for k in kappas):
        raise ValueError(f"kappas={kappas}: each k must be at least 1")
    scores = np.array([_retrieval_scores(r, p, i, kappas)
                       for r, p, i in zip(ranks, positives, ignored)]).reshape(-1, 1 + len(kappas))
    valid = ~np.isnan(scores[:, 0])
    means = scores[valid].mean(0) if valid.any() else np.full(1 + len(kappas), np.nan)
    return {"map": float(means[0]), "aps": scores[:, 0],
            **{f"mp@{k}": float(m) for k, m in zip(kappas, means[1:])},
            "skipped": int((~valid).sum())}


def classic_retrieval_map(ranks: np.ndarray, gnd: list) -> dict:
    """Oxford5k / Paris6k mAP: positives `ok` (good ∪ ok), `junk` ignored.

    Args:
        ranks: int [Q, N] rankings, best first.
        gnd: per query a dict with int arrays "ok" and "junk".
    """
    return retrieval_map(ranks, [g["ok"] for g in gnd], [g["junk"] for g in gnd])


def revisited_retrieval_map(ranks: np.ndarray, gnd: list, kappas: tuple = (1, 5, 10)) -> dict:
    """ROxford / RParis Easy, Medium and Hard mAP and mP@k (Radenović et al. 2018).

    Easy: positives easy, hard and junk ignored. Medium: positives easy ∪ hard, junk ignored.
    Hard: positives hard, easy and junk ignored.

    Args:
        ranks: int [Q, N] rankings, best first.
        gnd: per query a dict with int arrays "easy", "hard" and "junk".

    Returns:
        {"easy": ..., "medium": ..., "hard": ...}, each as `retrieval_map` returns.
    """
    def cat(g, *keys):
        return np.concatenate([np.asarray(g[k], np.int64).ravel() for k in keys])
    splits = {"easy": (("easy",), ("junk", "hard")), "medium": (("easy", "hard"), ("junk",)),
              "hard": (("hard",), ("junk", "easy"))}
    return {name: retrieval_map(ranks, [cat(g, *pos) for g in gnd],
                                [cat(g, *ign) for g in gnd], kappas)
            for name, (pos, ign) in splits.items()}


# ------------------------------------------------------------------------------ clustering
# `nmi` (arithmetic normalisation, as sklearn) is the one DeepCluster monitors training with.

def _check_labellings(labels_true: np.ndarray, labels_pred: np.ndarray):
    labels_true = np.asarray(labels_true)
    labels_pred = np.asarray(labels_pred)
    if labels_true.ndim != 1 or labels_true.shape != labels_pred.shape or not labels_true.size:
        raise ValueError(f"expected two non-empty 1-D labellings of equal length, got "
                         f"{labels_true.shape} and {labels_pred.shape}")
    for name, labels in (("labels_true", labels_true), ("labels_pred", labels_pred)):
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise ValueError(f"{name} must be non-negative integers, got {labels.dtype} with "
                             f"minimum {labels.min()}")
    return labels_true, labels_pred


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): 1 for identical partitions, ~0 at chance.

    Args:
        labels_true, labels_pred: int [N] labellings; the label values themselves do not matter.
    """
    labels_true, labels_pred = _check_labellings(labels_true, labels_pred)
    return float(sklearn.metrics.adjusted_rand_score(labels_true, labels_pred))


def clustering_accuracy(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Accuracy of the best one-to-one mapping from clusters to classes (Hungarian matching).

    With the contingency table n[c, y] (examples of cluster c and class y), the mapping m
    maximises sum_c n[c, m(c)]; accuracy = that sum / N. With more clusters than classes the
    unmatched clusters count as wrong, so over-clustering is not rewarded.

    Args:
        labels_true: int [N] classes.
        labels_pred: int [N] cluster ids.

    Returns:
        Accuracy in [0, 1].
    """
    labels_true, labels_pred = _check_labellings(labels_true, labels_pred)
    table = np.zeros((labels_pred.max() + 1, labels_true.max() + 1), np.int64)
    np.add.at(table, (labels_pred, labels_true), 1)
    rows, cols = scipy.optimize.linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / labels_true.size)


# ------------------------------------------------------------------------------ bootstrap

def _check_samples(samples: tuple) -> tuple:
    lengths = {len(a) for a in samples}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"samples must be non-empty and of one length; got lengths "
                         f"{sorted(len(a) for a in samples)}")
    return tuple(np.asarray(a) for a in samples)


def bootstrap_interval(statistic: Callable[..., float], samples: tuple, seed: int,
                       resamples: int = 1000, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of a mean-like `statistic(*samples)` over the examples.

    The test examples are what a probe's figure depends on by chance: resampling them with
    replacement (the same draw for every array, so paired figures stay paired, e.g. two models'
    hits on the same images) and recomputing the statistic gives its spread; the interval holds
    the central `level` of the resampled values (scipy.stats.bootstrap). For accuracies (means of
    per-image hits) and their differences. Not for NMI or ARI: a duplicated image adds agreement,
    so their resampled values sit above the figure (`half_sample_interval`).

    Args:
        statistic: arrays [n] (one per sample, resampled together) -> float.
        samples: equal-length arrays, one row per test example.
        seed: the resampling seed.
        resamples: bootstrap resamples.
        level: coverage of the interval.
    Returns:
        (low, high) floats.
    """
    result = scipy.stats.bootstrap(_check_samples(samples), statistic, n_resamples=resamples,
                                   vectorized=False, paired=True, confidence_level=level,
                                   method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(low), float(high)


def half_sample_interval(statistic: Callable[..., float], samples: tuple, seed: int,
                         resamples: int = 200, level: float = 0.95) -> tuple:
    """Normal interval of `statistic(*samples)` whose spread comes from random halves.

    Half-sampling (McCarthy 1969): for a mean, a half drawn without replacement from n examples
    has variance s^2/(n/2) * (1 - 1/2) = s^2/n around the full sample's mean, that of the full
    mean itself; the same holds to first order for smooth statistics. Halves hold no duplicated
    example, so NMI, ARI and clustering accuracy are not inflated as in a bootstrap. The interval
    is value +- z * (standard deviation of the half-sample values), centred on the figure.

    Args:
        statistic: arrays [n] (one per sample, subsampled together) -> float.
        samples: equal-length arrays, one row per test example (n >= 4).
        seed: the subsampling seed.
        resamples: random halves.
        level: coverage of the interval.
    Returns:
        (low, high) floats.
    """
    samples = _check_samples(samples)
    n = len(samples[0])
    if n < 4:
        raise ValueError(f"half-sampling needs at least 4 examples, got {n}")
    rng = np.random.default_rng(seed)
    halves = [statistic(*(a[idx] for a in samples))
              for idx in (rng.permutation(n)[:n // 2] for _ in range(resamples))]
    value = float(statistic(*samples))
    spread = scipy.stats.norm.ppf(0.5 + level / 2) * float(np.std(halves, ddof=1))
    return value - spread, value + spread
