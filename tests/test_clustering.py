"""Tests of dc_core.clustering: PCA whitening, FAISS k-means, PIC and assignment statistics.

Run: python -m pytest tests/test_clustering.py -q
"""

import importlib

import faiss
import numpy as np
import pytest
import scipy.sparse
import scipy.stats
import sklearn.metrics

from dc_core import clustering


def _sphere_blobs(seed, num_blobs, per_blob, dim, noise):
    """L2-normalised points around random unit centres, and their blob index."""
    rng = np.random.default_rng(seed)
    centres = clustering.l2_normalize(rng.standard_normal((num_blobs, dim)))
    truth = np.repeat(np.arange(num_blobs), per_blob)
    x = centres[truth] + noise * rng.standard_normal((truth.size, dim))
    return clustering.l2_normalize(x), truth


# ---------------------------------------------------------------- PCA ----

def test_pca_whitening_matches_svd_reference_and_whitens():
    rng = np.random.default_rng(0)
    width, dim, n = 6, 4, 4000
    mixing = rng.standard_normal((width, width)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    x = rng.standard_normal((n, width)) @ mixing.T + rng.normal(3.0, 1.0, width)

    pca = clustering.fit_pca_whitening(x, dim)
    assert pca.input_dim == width and pca.output_dim == dim
    assert pca.mean.dtype == np.float32 and pca.matrix.dtype == np.float32

    white = pca.apply(x)
    assert white.dtype == np.float32 and white.shape == (n, dim)
    np.testing.assert_allclose(white.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(dim), atol=1e-3)

    # Independent computation: right singular vectors of the centred data.
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred / np.sqrt(n), full_matrices=False)
    reference = vt[:dim].T / np.sqrt(singular[:dim] ** 2 + 1e-8)
    signs = np.sign((pca.matrix * reference).sum(axis=0))
    np.testing.assert_allclose(pca.matrix, reference * signs, rtol=1e-4,
                               atol=1e-5 * np.abs(reference).max())
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    peaks = pca.matrix[np.argmax(np.abs(pca.matrix), axis=0), np.arange(dim)]
    assert np.all(peaks > 0)

    new = rng.standard_normal((7, width)).astype(np.float32)
    np.testing.assert_allclose(pca.apply(new), (new - pca.mean) @ pca.matrix, rtol=1e-5,
                               atol=1e-5)


def test_pca_errors_name_the_flag():
    x = np.random.default_rng(0).standard_normal((10, 5))
    with pytest.raises(ValueError, match=r"--pca_dim=6 exceeds the feature width D=5"):
        clustering.fit_pca_whitening(x, 6)
    with pytest.raises(ValueError, match=r"--pca_dim=4 but only 3 examples.*lower --pca_dim"):
        clustering.fit_pca_whitening(x[:3], 4)
    with pytest.raises(ValueError, match=r"--pca_dim=0"):
        clustering.fit_pca_whitening(x, 0)


def test_l2_normalize_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    out = clustering.l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], atol=1e-6)


# ------------------------------------------------------------- k-means ----

def _blobs(seed=0, num_blobs=4, per_blob=100, dim=8):
    rng = np.random.default_rng(seed)
    centres = 10.0 * rng.standard_normal((num_blobs, dim))
    truth = np.repeat(np.arange(num_blobs), per_blob)
    x = centres[truth] + rng.standard_normal((truth.size, dim))
    return x.astype(np.float32), truth


def test_kmeans_reference_on_a_hand_example():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels, centroids, loss = clustering.kmeans_reference(x, np.array([[0.0], [10.0]]), niter=2)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    np.testing.assert_allclose(centroids, [[0.5], [10.5]])
    assert loss == pytest.approx(4 * 0.25)


def test_kmeans_recovers_blobs_and_matches_reference():
    x, truth = _blobs()
    result = clustering.kmeans(x, 4, seed=3)
    assert result.labels.dtype == np.int32 and result.labels.shape == (x.shape[0],)
    assert result.centroids.dtype == np.float32 and result.centroids.shape == (4, 8)
    assert result.empty_clusters == 0
    assert clustering.nmi(result.labels, truth) > 0.99

    # One reference step from FAISS's centroids: same assignment, and the same objective
    # (FAISS measures it at the assignment step, before its last centroid update).
    labels, _, loss = clustering.kmeans_reference(x, result.centroids, niter=1)
    np.testing.assert_array_equal(labels, result.labels)
    assert result.loss == pytest.approx(loss, rel=1e-4)
    # Lloyd from the true blob means reaches the same optimum.
    true_means = np.stack([x[truth == c].mean(axis=0) for c in range(4)])
    _, _, optimum = clustering.kmeans_reference(x, true_means, niter=20)
    assert result.loss == pytest.approx(optimum, rel=1e-4)


def _many_blobs():
    """6,400 float32 points around 64 separated centres in 16-d, and their blob index."""
    rng = np.random.default_rng(4)
    centres = 6.0 * rng.standard_normal((64, 16))
    truth = rng.integers(0, 64, 6400)
    return (centres[truth] + rng.standard_normal((6400, 16))).astype(np.float32), truth


def _objective(x, result):
    """Sum of squared distances of every example to its returned cluster's returned centroid."""
    return float(((x - result.centroids[result.labels]) ** 2).sum())


def test_two_level_kmeans_is_close_to_exact_on_many_blobs():
    # 64 separated blobs, k = 64: 8 FAISS cells of about 8 sub-clusters each, then one exact step.
    x, truth = _many_blobs()
    exact = clustering.kmeans(x, 64, seed=7)
    fast = clustering.kmeans(x, 64, seed=7, mode="two_level")
    assert np.all(np.bincount(fast.labels, minlength=64) > 0)
    assert _objective(x, fast) <= 1.02 * _objective(x, exact)
    assert clustering.nmi(fast.labels, exact.labels) > 0.9
    assert clustering.nmi(fast.labels, truth) > 0.9
    with pytest.raises(ValueError,
                       match=r"--kmeans_mode=hnsw: choose one of exact, two_level, shortlist"):
        clustering.kmeans(x, 64, seed=7, mode="hnsw")


def test_shortlist_kmeans_holding_every_centroid_is_lloyd():
    # k <= SHORTLIST_SIZE: every shortlist holds all k centroids, so each iteration is an exact
    # Lloyd step from the same start (k distinct examples drawn with the seed).
    x, _ = _blobs(seed=5, num_blobs=6, per_blob=80)
    k, seed, niter = 6, 11, 7
    result = clustering.kmeans(x, k, seed=seed, niter=niter, mode="shortlist")
    start = x[np.sort(np.random.default_rng(seed).choice(len(x), k, replace=False))]
    # The reference's (niter + 1)-th assignment is the final one: niter updates before it.
    labels, _, loss = clustering.kmeans_reference(x, start, niter=niter + 1)
    assert result.empty_clusters == 0
    np.testing.assert_array_equal(result.labels, labels)
    assert result.loss == pytest.approx(loss, rel=1e-4)
    # The returned centroids are those of the last update, as in the exact mode.
    _, centroids, _ = clustering.kmeans_reference(x, start, niter=niter)
    np.testing.assert_allclose(result.centroids, centroids, rtol=1e-5, atol=1e-5)


def test_shortlist_kmeans_with_short_lists_is_close_to_exact(monkeypatch):
    # 64 separated blobs, k = 64, shortlists of 4: most assignments see 4 of the 64 centroids.
    kmeans_module = importlib.import_module("dc_core.clustering.kmeans")  # not the function
    monkeypatch.setattr(kmeans_module, "SHORTLIST_SIZE", 4)
    x, truth = _many_blobs()
    exact = clustering.kmeans(x, 64, seed=7)
    fast = clustering.kmeans(x, 64, seed=7, mode="shortlist")
    assert np.all(np.bincount(fast.labels, minlength=64) > 0)
    # Exact k-means itself ends 20 % apart over seeds 7 and 8 here (522,679 and 433,983), and
    # NMI with another local optimum is no measure; the blobs are: both recover them alike.
    assert _objective(x, fast) <= 1.05 * _objective(x, exact)
    assert clustering.nmi(fast.labels, truth) > 0.9
    assert clustering.nmi(fast.labels, truth) >= clustering.nmi(exact.labels, truth) - 0.02


def test_kmeans_is_deterministic_per_seed():
    x = np.random.default_rng(1).standard_normal((600, 6)).astype(np.float32)
    first = clustering.kmeans(x, 10, seed=5)
    again = clustering.kmeans(x, 10, seed=5)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    assert first.loss == again.loss
    # Unstructured data has many local optima: another seed lands elsewhere, which shows the
    # seed reaches FAISS.
    other = clustering.kmeans(x, 10, seed=6)
    assert not np.array_equal(first.centroids, other.centroids)


def test_kmeans_few_points_per_cluster_and_bad_arguments():
    x = np.random.default_rng(2).standard_normal((20, 3)).astype(np.float32)
    result = clustering.kmeans(x, 5, seed=0)  # 4 points per centroid: FAISS only warns
    assert np.all(np.bincount(result.labels, minlength=5) > 0)
    with pytest.raises(ValueError, match=r"--num_clusters=21 exceeds the 20 examples"):
        clustering.kmeans(x, 21, seed=0)
    with pytest.raises(ValueError, match=r"--num_clusters=0"):
        clustering.kmeans(x, 0, seed=0)
    with pytest.raises(ValueError, match=r"shape \[N, d\]"):
        clustering.kmeans(x[0], 1, seed=0)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match=r"use_gpu=True"):
            clustering.kmeans(x, 2, seed=0, use_gpu=True)


def test_split_empty_cluster_divides_a_non_empty_cluster():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal([5.0, 5.0], 1.0, (10, 2)),
                        rng.normal([-5.0, 5.0], 1.0, (12, 2))]).astype(np.float32)
    labels = np.repeat([0, 1], [10, 12]).astype(np.int32)
    centroids = np.array([x[:10].mean(0), x[10:].mean(0), [1000.0, 1000.0]], np.float32)

    new_labels, new_centroids, repaired = clustering.split_empty_clusters(
        x, labels, centroids, seed=0)
    assert repaired == 1
    assert new_labels.dtype == np.int32 and new_centroids.dtype == np.float32
    sizes = np.bincount(new_labels, minlength=3)
    assert np.all(sizes > 0)
    split = 0 if sizes[0] < 10 else 1
    other = 1 - split
    np.testing.assert_array_equal(new_labels[labels == other], other)
    moved = new_labels[labels == split]
    assert set(moved.tolist()) == {split, 2}
    # FAISS's symmetric perturbation, sign alternating over dimensions.
    eps, sign = 1 / 1024, np.array([1.0, -1.0])
    np.testing.assert_allclose(new_centroids[2], centroids[split] * (1 + eps * sign), rtol=1e-6)
    np.testing.assert_allclose(new_centroids[split], centroids[split] * (1 - eps * sign),
                               rtol=1e-6)
    # Each moved point is nearer its new copy.
    members = np.flatnonzero(labels == split)
    d2 = ((x[members, None, :] - new_centroids[None, [split, 2]]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.where(d2[:, 0] <= d2[:, 1], split, 2), moved)


def test_split_never_picks_a_singleton_and_breaks_ties():
    # Cluster 0 is a singleton; cluster 1 has a zero centroid, so both copies coincide and every
    # point ties: half of them must still move.
    x = np.array([[9.0, 9.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], np.float32)
    labels = np.array([0, 1, 1, 1, 1], np.int32)
    centroids = np.array([[9.0, 9.0], [0.0, 0.0], [50.0, 50.0]], np.float32)
    for seed in range(5):
        new_labels, _, repaired = clustering.split_empty_clusters(x, labels, centroids, seed)
        assert repaired == 1
        np.testing.assert_array_equal(np.bincount(new_labels, minlength=3), [1, 2, 2])
    with pytest.raises(ValueError, match=r"lower --num_clusters"):
        clustering.split_empty_clusters(x[:2], labels[:2], centroids, seed=0)


# ----------------------------------------------------------------- PIC ----

def _pic_loop_reference(x, num_neighbors=5, sigma=0.2, alpha=0.001, niter=200):
    """The release's PIC written as its loops, with numpy brute-force neighbours."""
    n = x.shape[0]
    d2 = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    neighbors = np.argsort(d2, axis=1, kind="stable")[:, 1:num_neighbors + 1]
    weights = np.exp(-np.take_along_axis(d2, neighbors, 1) / sigma**2)
    a = scipy.sparse.csr_matrix((weights.ravel(), neighbors.ravel(),
                                 np.arange(n + 1) * num_neighbors), shape=(n, n))
    w = (a + a.T).tocsr()
    v = np.ones(n) / n
    for _ in range(niter):
        v = alpha * (w.T @ v) + (1 - alpha) / n
        v /= v.sum()
    pointers = list(range(n))
    for i in range(n):
        best = 0.0
        for entry in range(w.indptr[i], w.indptr[i + 1]):
            j = w.indices[entry]
            score = w.data[entry] * (v[j] - v[i])
            if score > best:
                best = score
                pointers[i] = j
    clust = []
    for i in range(n):
        node = i
        while pointers[node] != node:
            node = pointers[node]
        clust.append(node)
    members = {c: [i for i in range(n) if clust[i] == c] for c in set(clust)}
    moves = {}
    for c, m in members.items():
        if len(m) == 1:
            for nb in neighbors[m[0]]:
                if len(members[clust[nb]]) != 1:
                    moves[m[0]] = clust[nb]
                    break
    for s, c in moves.items():
        clust[s] = c
    return np.array(clust)


def _same_partition(a, b):
    return sklearn.metrics.adjusted_rand_score(a, b) == 1.0


def test_pic_matches_loop_reference():
    x, _ = _sphere_blobs(seed=4, num_blobs=3, per_blob=80, dim=8, noise=0.3)
    # A far outlier: its edge weights underflow to 0, so it is its own local maximum and a
    # singleton, which must join the cluster of its nearest neighbour, x[0].
    x = np.concatenate([x, 100.0 * x[:1]])
    labels = clustering.pic(x)
    assert _same_partition(labels, _pic_loop_reference(x))
    assert labels[-1] == labels[0]
    assert np.all(np.bincount(labels) > 1)


def test_pic_finds_blobs_and_respects_max_clusters():
    x, truth = _sphere_blobs(seed=1, num_blobs=4, per_blob=60, dim=16, noise=0.05)
    labels = clustering.pic(x)
    assert labels.dtype == np.int32 and labels.shape == truth.shape
    np.testing.assert_array_equal(np.unique(labels), np.arange(labels.max() + 1))
    # PIC over-segments, but no cluster straddles two blobs.
    assert sklearn.metrics.homogeneity_score(truth, labels) == pytest.approx(1.0)
    assert np.all(np.bincount(labels) > 1)  # singletons were merged

    merged = clustering.pic(x, max_clusters=4)
    assert clustering.nmi(merged, truth) > 0.9
    two = clustering.pic(x, max_clusters=2)
    np.testing.assert_array_equal(np.unique(two), [0, 1])


def test_pic_merges_closed_clusters_by_nearest_mean():
    # Blobs 0 and 1 are near each other, blob 2 is opposite; no k-NN edge joins blobs, so the
    # last merge goes by cluster means and must join 0 with 1.
    rng = np.random.default_rng(0)
    centres = clustering.l2_normalize(np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0],
                                                [-1.0, 0.0, 0.0]]))
    truth = np.repeat([0, 1, 2], 40)
    x = clustering.l2_normalize(centres[truth] + 0.03 * rng.standard_normal((120, 3)))
    two = clustering.pic(x, max_clusters=2)
    assert _same_partition(two, truth == 2)
    with pytest.raises(ValueError, match=r"num_neighbors=5"):
        clustering.pic(x[:5])


# --------------------------------------------------------------- stats ----

def test_cluster_sizes_and_acceptance_probabilities():
    labels = np.repeat([0, 1, 3, 4, -1], [10, 40, 200, 50, 7])
    np.testing.assert_array_equal(clustering.cluster_sizes(labels, 5), [10, 40, 0, 200, 50])
    probabilities = clustering.acceptance_probabilities(labels, 5)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, [1.0, 0.25, 0.0, 0.05, 0.2], rtol=1e-6)
    with pytest.raises(ValueError, match=r"num_clusters=4"):
        clustering.cluster_sizes(labels, 4)


def test_rejection_sampling_is_uniform_over_non_empty_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 3, 4, -1], [10, 40, 200, 50, 7])
    rng.shuffle(labels)
    # The appended 0 is what label -1 indexes: excluded examples are never accepted.
    probabilities = np.append(clustering.acceptance_probabilities(labels, 5), 0.0)
    draws = rng.integers(labels.size, size=200_000)
    accepted = labels[draws][rng.random(draws.size) < probabilities[labels[draws]]]
    counts = np.bincount(accepted, minlength=5)
    assert counts[2] == 0
    assert scipy.stats.chisquare(counts[[0, 1, 3, 4]]).pvalue > 0.001
    # The same test rejects plain uniform sampling over examples.
    plain = np.bincount(labels[draws][labels[draws] >= 0], minlength=5)
    assert scipy.stats.chisquare(plain[[0, 1, 3, 4]]).pvalue < 1e-6


def test_nmi_ignores_negative_labels():
    a = np.array([0, 0, 1, 1, 2, 2, -1, 0])
    b = np.array([5, 5, 7, 7, 9, 9, 5, -1])
    assert clustering.nmi(a, b) == pytest.approx(1.0)
    kept = slice(0, 6)
    c = np.array([0, 1, 1, 0, 2, 2, 1, -1])
    assert clustering.nmi(a, c) == pytest.approx(
        sklearn.metrics.normalized_mutual_info_score(a[kept], c[kept]))
    assert clustering.nmi(a, c) < 1.0
