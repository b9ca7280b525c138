"""Statistics of a cluster assignment: sizes, balanced-sampling probabilities, NMI.

A label below zero marks an example left out of the clustering (e.g. an unreadable image); all
three functions ignore such examples.
"""

import numpy as np
import sklearn.metrics


def _check_labels(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters={num_clusters} must be at least 1")
    if labels.size and labels.max() >= num_clusters:
        raise ValueError(
            f"label {labels.max()} is out of range for num_clusters={num_clusters}; "
            "pass the number of clusters the labels were made with")
    return labels


def cluster_sizes(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """Counts the examples of each cluster.

    Args:
        labels: int [N] cluster of each example, < num_clusters; negative entries are ignored.
        num_clusters: k.

    Returns:
        int64 [k] sizes (zero for empty clusters).
    """
    labels = _check_labels(labels, num_clusters)
    return np.bincount(labels[labels >= 0], minlength=num_clusters).astype(np.int64)


def acceptance_probabilities(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    """Per-cluster acceptance probabilities of the class-balanced rejection sampler.

    p_c = n_min / n_c for a non-empty cluster c, with n_min the smallest non-empty size, and 0
    for an empty cluster. Drawing an index uniformly and accepting example i with probability
    p[label_i] accepts from cluster c with probability (n_c / N) * (n_min / n_c) = n_min / N, the
    same for every non-empty cluster, so the accepted examples are uniform over the non-empty
    clusters (and uniform within each cluster). The smallest cluster is always accepted.

    Args:
        labels: int [N] cluster of each example, < num_clusters; negative entries are ignored.
        num_clusters: k.

    Returns:
        float32 [k] probabilities in [0, 1].
    """
    sizes = cluster_sizes(labels, num_clusters)
    filled = sizes > 0
    if not filled.any():
        raise ValueError("no example has a cluster label >= 0; there is nothing to sample")
    probabilities = np.zeros(num_clusters, dtype=np.float64)
    probabilities[filled] = sizes[filled].min() / sizes[filled]
    return probabilities.astype(np.float32)


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information of two labellings, arithmetic-mean normalisation.

    Positions where either label is negative are ignored, as are the label values themselves
    (NMI is invariant to renaming clusters).

    Args:
        a: int [N] labels.
        b: int [N] labels.

    Returns:
        NMI in [0, 1], as sklearn.metrics.normalized_mutual_info_score.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"nmi needs two 1-D labellings of equal length, got {a.shape}, {b.shape}")
    kept = (a >= 0) & (b >= 0)
    if not kept.any():
        raise ValueError("no position has both labels >= 0; nothing to compare")
    return float(sklearn.metrics.normalized_mutual_info_score(
        a[kept], b[kept], average_method="arithmetic"))


def cluster_table(assignment: np.ndarray, labels: np.ndarray) -> list:
    """One dict per non-empty cluster: id, size, and with labels the majority label and purity
    (the majority label's share of the cluster's labelled members). Largest clusters first."""
    valid = assignment >= 0
    k = int(assignment.max()) + 1
    sizes = np.bincount(assignment[valid], minlength=k)
    labelled = valid & (labels >= 0)
    contingency = None
    if labelled.any():
        num_labels = int(labels.max()) + 1
        contingency = np.bincount(assignment[labelled] * num_labels + labels[labelled],
                                  minlength=k * num_labels).reshape(k, num_labels)
    rows = []
    for c in np.flatnonzero(sizes):
        row = {"cluster": int(c), "size": int(sizes[c])}
        if contingency is not None and contingency[c].sum():
            row.update(majority_label=int(contingency[c].argmax()),
                       purity=contingency[c].max() / contingency[c].sum())
        rows.append(row)
    return sorted(rows, key=lambda r: -r["size"])
