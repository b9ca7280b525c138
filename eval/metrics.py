"""Scores shared by the evaluations: numpy arrays in, Python floats or numpy arrays out.

Sections:
  Classification   top-k accuracy of class scores.
  kNN              the cosine-weighted vote of a k-nearest-neighbour classifier.
  Clustering       NMI, ARI and clustering accuracy (Hungarian matching) against labels.

No TensorFlow and no FAISS here: the programs search and extract, these functions score.
"""

import numpy as np
import scipy.optimize
import sklearn.metrics

from dc_tf.clustering.stats import nmi

__all__ = ["adjusted_rand_index", "clustering_accuracy", "knn_class_scores", "nmi",
           "top_k_accuracy"]


# ------------------------------------------------------------------------------ classification

def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of examples whose label is among their k highest-scoring classes.

    Ties are broken towards the lower class index (a stable sort of the negated scores), so the
    result is deterministic.

    Args:
        scores: float [N, C] logits, probabilities or votes.
        labels: int [N] true classes in [0, C).
        k: 1 <= k; k >= C counts every example as correct.

    Returns:
        Accuracy in [0, 1].
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
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


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
