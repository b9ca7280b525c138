"""Spherical k-means of DeepCluster-v2 (docs/protocols.md §9), on unit vectors.

As the authors' `main_deepclusterv2.py`: k centroids start as k distinct random rows, then each
iteration assigns every row to the centroid of largest dot product and moves each non-empty
centroid to the L2-normalised mean of its rows; an empty centroid keeps its place (no split, unlike
DeepCluster's k-means). A last assignment follows the last update. The assignments are exact
FAISS inner-product searches (on every GPU FAISS sees, when there is one); the updates are numpy.
"""

import dataclasses

import faiss
import numpy as np

from dc_core.clustering.kmeans import _cluster_sums


@dataclasses.dataclass
class SphericalKMeansResult:
    """labels int32 [N]; centroids float32 [k, d] unit rows; loss = sum of squared distances of
    the rows to their centroids (2 - 2 cos for unit vectors); empty_clusters after the last
    assignment."""
    labels: np.ndarray
    centroids: np.ndarray
    loss: float
    empty_clusters: int


def _nearest(x: np.ndarray, centroids: np.ndarray, use_gpu: bool) -> tuple:
    """(int32 [N] centroid of largest dot product, float32 [N] that dot product)."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    similarity, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int32), similarity[:, 0]


def spherical_kmeans(x: np.ndarray, num_clusters: int, seed: int, niter: int = 10,
                     use_gpu: bool | None = None) -> SphericalKMeansResult:
    """Clusters the unit rows of x by direction.

    Args:
      x: float32 [N, d], rows of unit norm (embeddings after L2 normalisation).
      num_clusters: k <= N.
      seed: picks the k starting rows.
      niter: update iterations (DeepCluster-v2: 10).
      use_gpu: None uses every GPU FAISS sees, if any.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if x.ndim != 2 or not 2 <= num_clusters <= n:
        raise ValueError(f"x {x.shape} must be [N, d] with 2 <= num_clusters={num_clusters} <= N")
    use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, num_clusters, replace=False)].copy()
    for _ in range(niter):
        labels, _ = _nearest(x, centroids, use_gpu)
        sums = _cluster_sums(x, labels, num_clusters)
        norms = np.linalg.norm(sums, axis=1)
        moved = np.bincount(labels, minlength=num_clusters) > 0
        centroids[moved] = (sums[moved] / np.maximum(norms[moved, None], 1e-12)).astype(np.float32)
    labels, similarity = _nearest(x, centroids, use_gpu)
    empty = num_clusters - np.count_nonzero(np.bincount(labels, minlength=num_clusters))
    return SphericalKMeansResult(labels, centroids,
                                 float(np.sum(2.0 - 2.0 * similarity.astype(np.float64))),
                                 int(empty))
