"""k-means with FAISS, as DeepCluster runs it, plus the empty-cluster repair and a numpy reference.

`kmeans` follows the released code: `faiss.Clustering` with 20 iterations, no subsampling
(`max_points_per_centroid` 10,000,000), an exact L2 index, then the final assignment by nearest
centroid (docs/protocols.md §2). FAISS repairs empty clusters inside its iterations, but the final
assignment can still leave some empty; `split_empty_clusters` repairs those with the same rule.
FAISS (1.15) stops before niter iterations once its objective stops decreasing (on the ImageNet-
size synthetic benchmark, after 10).

`mode="two_level"` is a fast option for large k (bench/kmeans.py: ImageNet size): FAISS's
`two_level_clustering` first splits the data into about sqrt(k) cells, then runs k-means inside
each cell with a share of the k centroids proportional to the cell's size, so an example is
compared with about 2 sqrt(k) centroids per iteration instead of k. One exact Lloyd step over
all k centroids then repairs the examples that sit near a cell border, before the same final
assignment as the exact mode.

`mode="shortlist"` is the fast option at ImageNet size on CPUs: Lloyd iterations in which only
the first assignment compares every example with all k centroids and keeps its 16 nearest as
its shortlist; later assignments look at the shortlist alone, but for one exact search again of
the 30 % of examples farthest from their centroid at the fifth. Its objective stays within 1 %
of the exact one on synthetic blobs (where two-level's is 5 % higher) and on real features at
k = 1,000 (bench/RESULTS.md §8).
"""

import dataclasses
import time

import faiss
import numpy as np
import scipy.sparse
from faiss.contrib.clustering import two_level_clustering

# k-means: the paper's (exact, flat), FAISS's two-level clustering refined by one exact step, or
# Lloyd iterations over each example's shortlist of nearest centroids (`kmeans`).
KMEANS_MODES = ("exact", "two_level", "shortlist")


# FAISS's Clustering.seed is a C int.
_MAX_SEED = 2**31

# The shortlist mode (bench/RESULTS.md §8 has the schedules that were measured): how many nearest
# centroids each example keeps from an exact search; the iteration whose assignment searches all
# k centroids again for the examples farthest from their centroid, and their share. By then the
# centroids have left the random examples they started from, and the far examples are those
# whose blob of data the first shortlists missed.
SHORTLIST_SIZE = 16
SHORTLIST_REFRESH_ITERATION = 4
SHORTLIST_REFRESH_SHARE = 0.3


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """The outcome of one k-means run.

    Attributes:
        labels: int32 [N], cluster of each example, in [0, k); every cluster is non-empty.
        centroids: float32 [k, d].
        loss: the last FAISS k-means objective: the sum over examples of the squared L2 distance
            to the nearest centroid, at the last iteration's assignment step.
        empty_clusters: clusters that were empty in the final assignment and were repaired by
            `split_empty_clusters`.
    """

    labels: np.ndarray
    centroids: np.ndarray
    loss: float
    empty_clusters: int


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [n, m] squared L2 distances between the rows of a [n, d] and b [m, d]."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + (b * b).sum(1)[None, :]
    # The expansion can round slightly below zero for coincident points.
    return np.maximum(d2, 0.0)


def _flat_l2_index(dim: int, use_gpu: bool) -> faiss.Index:
    """An exact L2 index, spread over all GPUs when use_gpu."""
    index = faiss.IndexFlatL2(dim)
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def kmeans(x: np.ndarray, num_clusters: int, seed: int, niter: int = 20,
           max_points_per_centroid: int = 10_000_000, use_gpu: bool | None = None,
           verbose: bool = False, mode: str = "exact") -> KMeansResult:
    """Clusters features with FAISS k-means and returns an assignment with no empty cluster.

    Fewer than 39 examples per cluster is allowed: FAISS prints a warning and carries on.

    Args:
        x: float [N, d] features (converted to C-contiguous float32).
        num_clusters: k, 1 <= k <= N.
        seed: FAISS seed, in [0, 2**31); DeepCluster draws a fresh one every epoch. Also seeds
            the final empty-cluster repair.
        niter: Lloyd iterations, at most: exact and shortlist stop earlier at a fixed point.
        max_points_per_centroid: FAISS subsamples to k * this many examples; the default never
            subsamples, as in the paper.
        use_gpu: None uses every GPU FAISS sees, if any; True requires one; False stays on CPU.
        verbose: print a log line per iteration.
        mode: "exact" (the paper), "two_level" (niter iterations for the cells, FAISS's 25
            inside them, then one exact step; the loss is that step's objective) or
            "shortlist" (niter Lloyd iterations, most of them over each example's shortlist).

    Returns:
        A KMeansResult.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"k-means expects features of shape [N, d], got {x.shape}")
    n, dim = x.shape
    if num_clusters < 1:
        raise ValueError(f"--num_clusters={num_clusters} must be at least 1")
    if num_clusters > n:
        raise ValueError(
            f"--num_clusters={num_clusters} exceeds the {n} examples; lower --num_clusters "
            "or add data")
    if niter < 1:
        raise ValueError(f"niter={niter} must be at least 1")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed={seed} must be in [0, 2**31) (FAISS stores it as a C int)")
    if mode not in KMEANS_MODES:
        raise ValueError(f"--kmeans_mode={mode}: choose one of {', '.join(KMEANS_MODES)}")
    num_gpus = faiss.get_num_gpus()
    if use_gpu is None:
        use_gpu = num_gpus > 0
    elif use_gpu and num_gpus == 0:
        raise ValueError(
            "use_gpu=True but FAISS sees no GPU (faiss-cpu, or no visible device); "
            "pass use_gpu=None to run on the CPU")

    if mode == "shortlist":
        labels, centroids, loss = _shortlist_kmeans(x, num_clusters, seed, niter, use_gpu,
                                                    verbose)
    else:
        labels, centroids, loss = _faiss_kmeans(x, num_clusters, seed, niter,
                                                max_points_per_centroid, use_gpu, verbose, mode)
    labels, centroids, empty = split_empty_clusters(x, labels, centroids, seed=seed)
    return KMeansResult(labels=labels, centroids=centroids, loss=loss, empty_clusters=empty)


def _faiss_kmeans(x, num_clusters, seed, niter, max_points_per_centroid, use_gpu, verbose, mode):
    """FAISS's Lloyd iterations (exact) or two-level clustering plus one exact step, then the
    final assignment by nearest centroid: (labels int32 [N], centroids [k, d], loss)."""
    dim = x.shape[1]
    clus = faiss.Clustering(dim, num_clusters)
    clus.niter = niter
    if mode == "two_level":
        cells = int(round(np.sqrt(num_clusters)))  # in [1, k] for every k >= 1
        # FAISS's settings inside the cells (25 iterations, at most 256 examples per centroid)
        # cannot be passed through; the coarse level takes niter.
        start, _ = two_level_clustering(x, cells, num_clusters, clustering_niter=niter,
                                        seed=int(seed), gpu=use_gpu, verbose=verbose)
        # FAISS starts from centroids already set; one iteration = the exact refinement step.
        faiss.copy_array_to_vector(np.ascontiguousarray(start, np.float32).ravel(),
                                   clus.centroids)
        clus.niter = 1
    clus.seed = int(seed)
    clus.max_points_per_centroid = int(max_points_per_centroid)
    clus.verbose = verbose
    index = _flat_l2_index(dim, use_gpu)
    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(num_clusters, dim)
    stats = clus.iteration_stats
    loss = float(stats.at(stats.size() - 1).obj)

    # Assign with the final centroids explicitly rather than relying on what train() left
    # in the index.
    index.reset()
    index.add(centroids)
    _, nearest = index.search(x, 1)
    return nearest[:, 0].astype(np.int32), centroids, loss


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """float64 [k, d]: the sum of the rows of x in each cluster (one sparse one-hot product)."""
    n = len(x)
    members = scipy.sparse.csr_matrix((np.ones(n, x.dtype), (labels, np.arange(n))), shape=(k, n))
    return (members @ x).astype(np.float64)


def _shortlist_kmeans(x, num_clusters, seed, niter, use_gpu, verbose):
    """Lloyd iterations where most assignments only look at each example's shortlist.

    The first assignment compares every example with all k centroids (FAISS's exact search, on
    the GPUs when use_gpu) and keeps its SHORTLIST_SIZE nearest as its shortlist. Every later
    assignment moves each example to the nearest centroid of its shortlist (FAISS's
    `compute_distance_subset`: N x SHORTLIST_SIZE distances instead of N x k), except that at
    SHORTLIST_REFRESH_ITERATION the SHORTLIST_REFRESH_SHARE of examples farthest from their
    centroid are searched exactly again. Stops early at a fixed point (no example changed
    cluster: further iterations would repeat it), as FAISS does once its objective stops
    decreasing. The start is k distinct examples drawn with the seed, like FAISS's.

    Returns (labels int32 [N], centroids float32 [k, d] of the last update, loss of the last
    assignment); clusters may be empty."""
    n, dim = x.shape
    rng = np.random.default_rng(seed)
    centroids = x[np.sort(rng.choice(n, num_clusters, replace=False))].copy()
    size = min(SHORTLIST_SIZE, num_clusters)
    rows = np.arange(n)
    index = _flat_l2_index(dim, use_gpu)  # exact searches
    shortlist_index = faiss.IndexFlatL2(dim)  # shortlist distances: CPU only in FAISS
    labels = None
    for iteration in range(niter + 1):  # the assignment after the last update is the final one
        start = time.time()
        if iteration == 0:
            index.add(centroids)
            distances, shortlist = index.search(x, size)
            nearest = np.zeros(n, np.int64)
        else:
            shortlist_index.reset()
            shortlist_index.add(centroids)
            shortlist_index.compute_distance_subset(
                n, faiss.swig_ptr(x), size, faiss.swig_ptr(distances), faiss.swig_ptr(shortlist))
            nearest = distances.argmin(axis=1)
            count = int(SHORTLIST_REFRESH_SHARE * n)
            if iteration == SHORTLIST_REFRESH_ITERATION and count:
                far = np.sort(np.argpartition(distances[rows, nearest], n - count)[n - count:])
                index.reset()
                index.add(centroids)
                distances[far], shortlist[far] = index.search(x[far], size)
                nearest[far] = 0
        previous, labels = labels, shortlist[rows, nearest].astype(np.int32)
        loss = float(distances[rows, nearest].sum(dtype=np.float64))
        if verbose:
            print(f"  iteration {iteration} ({time.time() - start:.2f} s): objective={loss:g}",
                  flush=True)
        if iteration == niter or (iteration > SHORTLIST_REFRESH_ITERATION
                                  and np.array_equal(labels, previous)):
            return labels, centroids, loss
        # Centroid update: the running sums change by the examples that moved (few, after the
        # first iterations); an empty cluster keeps its centroid.
        if previous is None:
            sums = _cluster_sums(x, labels, num_clusters)
        else:
            moved = np.flatnonzero(labels != previous)
            sums += (_cluster_sums(x[moved], labels[moved], num_clusters)
                     - _cluster_sums(x[moved], previous[moved], num_clusters))
        sizes = np.bincount(labels, minlength=num_clusters)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]


def split_empty_clusters(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, seed: int,
                         eps: float = 1 / 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """Gives every empty cluster half of a split non-empty cluster (FAISS's / the paper's rule).

    For each empty cluster i, a cluster j is drawn with probability proportional to
    (size_j - 1), so singletons are never split; c_i becomes a copy of c_j and the pair is pushed
    apart by a symmetric relative perturbation eps, with the sign alternating over dimensions
    exactly as faiss/Clustering.cpp `split_clusters` does (even dimensions c_i *= 1 + eps,
    c_j *= 1 - eps; odd dimensions the reverse). j's points then go to the nearer copy. When
    ties leave one copy empty (a zero centroid, identical points), the half of j's points
    relatively closest to c_i moves to i, so both copies end non-empty.

    Args:
        x: float [N, d] the clustered features.
        labels: int [N] cluster of each example, in [0, k).
        centroids: float [k, d].
        seed: seeds the choice of the clusters to split.
        eps: relative perturbation; FAISS uses 1/1024.

    Returns:
        labels: int32 [N] with every cluster non-empty.
        centroids: float32 [k, d], perturbed copies for the split pairs, others unchanged.
        repaired: number of clusters that were empty.
    """
    x = np.asarray(x)
    labels = np.array(labels, dtype=np.int32)
    centroids = np.array(centroids, dtype=np.float32)
    if x.ndim != 2 or centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(f"x {x.shape} and centroids {centroids.shape} must be [N, d] and [k, d]")
    (n, _), (k, dim) = x.shape, centroids.shape
    if labels.shape != (n,):
        raise ValueError(f"labels has shape {labels.shape}, expected ({n},) to match x")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    sizes = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(sizes == 0)
    if empty.size and n < k:
        raise ValueError(
            f"{k} clusters cannot all be non-empty with {n} examples; lower --num_clusters")

    rng = np.random.default_rng(seed)
    sign = np.where(np.arange(dim) % 2 == 0, 1.0, -1.0)
    for ci in empty:
        weights = np.maximum(sizes - 1, 0).astype(np.float64)
        cj = rng.choice(k, p=weights / weights.sum())
        base = centroids[cj].astype(np.float64)
        centroids[ci] = base * (1 + eps * sign)
        centroids[cj] = base * (1 - eps * sign)
        members = np.flatnonzero(labels == cj)
        d2 = _squared_distances(x[members], centroids[[ci, cj]])
        margin = d2[:, 0] - d2[:, 1]
        to_new = margin < 0
        if to_new.all() or not to_new.any():
            to_new = np.zeros(members.size, dtype=bool)
            to_new[np.argsort(margin, kind="stable")[:members.size // 2]] = True
        labels[members[to_new]] = ci
        sizes[ci] = np.count_nonzero(to_new)
        sizes[cj] -= sizes[ci]
    return labels, centroids, int(empty.size)


def kmeans_reference(x: np.ndarray, init_centroids: np.ndarray,
                     niter: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Plain numpy Lloyd iterations in float64, the reference the FAISS path is tested against.

    Each iteration assigns every example to its nearest centroid, records the objective, then
    moves each centroid to the mean of its examples (an empty cluster keeps its centroid; no
    splitting). The loss is therefore measured the way FAISS measures it.

    Args:
        x: float [N, d].
        init_centroids: float [k, d] starting centroids.
        niter: iterations, at least 1.

    Returns:
        labels: int32 [N], the last assignment.
        centroids: float32 [k, d], after the last update.
        loss: sum of squared distances at the last assignment.
    """
    x = np.asarray(x, dtype=np.float64)
    centroids = np.array(init_centroids, dtype=np.float64)
    if x.ndim != 2 or centroids.ndim != 2 or centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"x {x.shape} and init_centroids {centroids.shape} must be [N, d] and [k, d]")
    if niter < 1:
        raise ValueError(f"niter={niter} must be at least 1")
    k = centroids.shape[0]
    for _ in range(niter):
        d2 = _squared_distances(x, centroids)
        labels = np.argmin(d2, axis=1)
        loss = float(d2[np.arange(x.shape[0]), labels].sum())
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return labels.astype(np.int32), centroids.astype(np.float32), loss
