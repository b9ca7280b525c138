"""Power Iteration Clustering (PIC), DeepCluster's alternative to k-means.

Follows the release's `clustering.py` (`make_graph`, `make_adjacencyW`, `run_pic`,
`find_maxima_cluster`, `PIC.cluster`): a k-NN graph, 200 power iterations of a random walk with
restart, then each node climbs to a local maximum of the stationary vector; nodes reaching the
same maximum form a cluster (docs/protocols.md §2). The release preprocesses inside
`PIC.cluster`; here the caller passes features that are already PCA-whitened and
L2-normalised, as for k-means.
"""

import heapq

import faiss
import numpy as np
import scipy.sparse


def _knn(x: np.ndarray, num_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row, itself excluded.

    Returns:
        neighbors: int64 [N, num_neighbors], nearest first.
        sq_distances: float32 [N, num_neighbors], FAISS's squared L2 distances.
    """
    index = faiss.IndexFlatL2(x.shape[1])
    # Exact search is quadratic in N; the release ran it on a GPU, so use every GPU FAISS sees.
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    sq_distances, neighbors = index.search(x, num_neighbors + 1)
    # The release drops column 0, assuming it is the node itself; with duplicate points a twin
    # can come first, so drop the node's own entry wherever it is (the last column if absent).
    is_self = neighbors == np.arange(x.shape[0])[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    shape = (x.shape[0], num_neighbors)
    return neighbors[keep].reshape(shape), sq_distances[keep].reshape(shape)


def _local_maxima(graph: scipy.sparse.csr_matrix, v: np.ndarray) -> np.ndarray:
    """Labels each node by the local maximum of v that its steepest ascent reaches.

    Node i points to the neighbour j maximising W_ij * (v_j - v_i) when that is positive, else
    to itself. The release once set `vi = best_vi` instead of `best_vi = vi` (deepcluster issue
    #19), which kept the last positive neighbour rather than the best; this keeps the best.

    Returns:
        int32 [N] contiguous labels, numbered by the index of each cluster's maximum.
    """
    n = graph.shape[0]
    rows = np.repeat(np.arange(n), np.diff(graph.indptr))
    scores = graph.data * (v[graph.indices] - v[rows])
    row_best = np.full(n, -np.inf)
    np.maximum.at(row_best, rows, scores)
    winners = np.flatnonzero((scores > 0) & (scores == row_best[rows]))
    # Among equal scores, the first in row order wins, as in the release's strict `>` loop.
    winning_rows, first = np.unique(rows[winners], return_index=True)
    pointers = np.arange(n)
    pointers[winning_rows] = graph.indices[winners[first]]
    # Every pointer climbs to a strictly larger v, so there are no cycles: pointer jumping
    # reaches the fixed point (each node -> its maximum) in O(log depth) rounds.
    while True:
        jumped = pointers[pointers]
        if np.array_equal(jumped, pointers):
            break
        pointers = jumped
    return np.unique(pointers, return_inverse=True)[1].astype(np.int32)


def _merge_singletons(labels: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """The release's `distribute_singletons`: a singleton joins the cluster of its nearest
    neighbour whose cluster (before any move) is not a singleton; it stays alone if none is."""
    sizes = np.bincount(labels)
    merged = labels.copy()
    for node in np.flatnonzero(sizes[labels] == 1):
        hosts = neighbors[node][sizes[labels[neighbors[node]]] > 1]
        if hosts.size:
            merged[node] = labels[hosts[0]]
    return np.unique(merged, return_inverse=True)[1].astype(np.int32)


def _merge_to_max_clusters(x: np.ndarray, labels: np.ndarray, neighbors: np.ndarray,
                           sq_distances: np.ndarray, max_clusters: int) -> np.ndarray:
    """Merges the smallest cluster into a neighbouring one until at most max_clusters remain.

    The target is the cluster of the nearest k-NN neighbour, outside the cluster, of any of its
    members; a cluster with no k-NN edge leaving it joins the cluster with the nearest mean.
    Ties in size go to the lower cluster id.
    """
    labels = labels.copy()
    num = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")
    members = [list(m) for m in np.split(order, np.cumsum(np.bincount(labels))[:-1])]
    counts = np.bincount(labels).astype(np.float64)
    sums = np.zeros((num, x.shape[1]))
    np.add.at(sums, labels, x.astype(np.float64))
    alive = np.ones(num, dtype=bool)
    heap = [(int(size), c) for c, size in enumerate(counts)]
    heapq.heapify(heap)
    remaining = num
    while remaining > max_clusters:
        size, c = heapq.heappop(heap)
        if not alive[c] or size != counts[c]:
            continue  # stale entry: the cluster was merged away or has grown
        idx = np.asarray(members[c])
        outside = labels[neighbors[idx]] != c
        if outside.any():
            flat = np.flatnonzero(outside.ravel())
            best = flat[np.argmin(sq_distances[idx].ravel()[flat])]
            target = labels[neighbors[idx].ravel()[best]]
        else:
            d2 = np.full(num, np.inf)
            d2[alive] = ((sums[alive] / counts[alive, None] - sums[c] / counts[c]) ** 2).sum(1)
            d2[c] = np.inf
            target = int(np.argmin(d2))
        labels[idx] = target
        members[target].extend(members[c])
        members[c] = []
        sums[target] += sums[c]
        counts[target] += counts[c]
        alive[c] = False
        remaining -= 1
        heapq.heappush(heap, (int(counts[target]), target))
    return np.unique(labels, return_inverse=True)[1].astype(np.int32)


def pic(x: np.ndarray, num_neighbors: int = 5, sigma: float = 0.2, alpha: float = 0.001,
        niter: int = 200, max_clusters: int | None = None) -> np.ndarray:
    """Clusters features by Power Iteration Clustering, as the DeepCluster release does.

    1. k-NN graph by exact FAISS search (on every GPU FAISS sees, if any);
       A_ij = exp(-d_ij / sigma**2) with d FAISS's squared L2 distance; W = A + A^T (a mutual
       edge gets both weights).
    2. v_0 = 1/N; v <- alpha * W^T v + (1 - alpha) / N, then L1-normalised; niter times. The
       formula is the release's; it is computed in float64 where the release used float32,
       because v_j - v_i is tiny when N is large.
    3. Each node points to its neighbour maximising W_ij * (v_j - v_i) if positive (the best one;
       deepcluster issue #19), pointers are followed to a local maximum, one cluster per maximum.
    4. Singletons join the cluster of their nearest non-singleton neighbour.
    5. If max_clusters is given (not in the release), the smallest clusters are merged into a
       neighbouring one until at most max_clusters remain (a head of that width covers them).

    Args:
        x: float [N, d] features, already PCA-whitened and L2-normalised.
        num_neighbors: k of the k-NN graph; N must exceed it.
        sigma: kernel width, in the units of the L2-normalised features.
        alpha: weight of the graph walk against the uniform restart.
        niter: power iterations.
        max_clusters: upper bound on the number of clusters, or None for no bound.

    Returns int32 [N] labels, contiguous in 0..C-1.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"PIC expects features of shape [N, d], got {x.shape}")
    n = x.shape[0]
    if num_neighbors < 1:
        raise ValueError(f"num_neighbors={num_neighbors} must be at least 1")
    if n <= num_neighbors:
        raise ValueError(
            f"PIC with num_neighbors={num_neighbors} needs more than {num_neighbors} examples, "
            f"got {n}; add data or lower num_neighbors")
    if sigma <= 0 or not 0 < alpha < 1 or niter < 1:
        raise ValueError(
            f"need sigma > 0, 0 < alpha < 1 and niter >= 1; got sigma={sigma}, alpha={alpha}, "
            f"niter={niter}")
    if max_clusters is not None and max_clusters < 1:
        raise ValueError(f"max_clusters={max_clusters} must be at least 1 (or None)")

    neighbors, sq_distances = _knn(x, num_neighbors)
    weights = np.exp(-sq_distances.astype(np.float64) / sigma**2)
    indptr = np.arange(n + 1) * num_neighbors
    adjacency = scipy.sparse.csr_matrix((weights.ravel(), neighbors.ravel(), indptr), shape=(n, n))
    graph = (adjacency + adjacency.T).tocsr()

    walk = graph.T.tocsr()
    v = np.full(n, 1.0 / n)
    for _ in range(niter):
        v = alpha * (walk @ v) + (1 - alpha) / n
        v /= v.sum()

    labels = _local_maxima(graph, v)
    labels = _merge_singletons(labels, neighbors)
    if max_clusters is not None and labels.max() + 1 > max_clusters:
        labels = _merge_to_max_clusters(x, labels, neighbors, sq_distances, max_clusters)
    return labels
