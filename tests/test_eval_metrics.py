"""eval.metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
import sklearn.metrics

from eval import metrics


def _random_labellings(seed, n=500):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 7, n)
    # Half copied from the truth under a renaming, half random: a partial agreement.
    pred = np.where(rng.random(n) < 0.5, (truth * 3 + 1) % 7, rng.integers(0, 9, n))
    return truth, pred


@pytest.mark.parametrize("seed", [0, 1])
def test_nmi_and_ari_match_sklearn(seed):
    truth, pred = _random_labellings(seed)
    assert metrics.nmi(truth, pred) == pytest.approx(
        sklearn.metrics.normalized_mutual_info_score(truth, pred, average_method="arithmetic"))
    assert metrics.adjusted_rand_index(truth, pred) == pytest.approx(
        sklearn.metrics.adjusted_rand_score(truth, pred))
    assert 0.1 < metrics.nmi(truth, pred) < 0.9


def test_nmi_and_ari_of_a_renamed_labelling_are_one():
    truth = np.array([0, 0, 1, 1, 2, 2, 2])
    renamed = np.array([5, 5, 0, 0, 3, 3, 3])
    assert metrics.nmi(truth, renamed) == pytest.approx(1.0)
    assert metrics.adjusted_rand_index(truth, renamed) == pytest.approx(1.0)


def test_clustering_accuracy_of_a_permuted_labelling_is_one():
    truth = np.random.default_rng(0).integers(0, 10, 1000)
    permutation = np.random.default_rng(1).permutation(10)
    assert metrics.clustering_accuracy(truth, permutation[truth]) == 1.0


def test_clustering_accuracy_hand_computed():
    truth = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([1, 1, 0, 0, 0, 0, 2, 2])
    # Contingency (cluster x class): c1 -> {0: 2}, c0 -> {0: 1, 1: 3}, c2 -> {2: 2}; the best
    # matching c1->0, c0->1, c2->2 gets 2 + 3 + 2 of 8 right.
    assert metrics.clustering_accuracy(truth, pred) == pytest.approx(7 / 8)
    # More clusters than classes: only one cluster can map to each class.
    assert metrics.clustering_accuracy(np.array([0, 0, 1, 1]),
                                       np.array([0, 1, 2, 2])) == pytest.approx(3 / 4)


def test_top_k_accuracy_hand_computed():
    scores = np.array([[0.1, 0.5, 0.4],
                       [0.7, 0.2, 0.1],
                       [0.3, 0.3, 0.4]])
    labels = np.array([2, 0, 1])
    assert metrics.top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    # Row 2 ties classes 0 and 1 for second place; the lower index wins, so label 1 misses.
    assert metrics.top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(scores, labels, 3) == 1.0


def test_knn_votes_are_weighted_by_the_temperature():
    similarities = np.array([[0.9, 0.8, 0.1]])
    neighbours = np.array([[1, 0, 0]])
    sharp = metrics.knn_class_scores(similarities, neighbours, 3, temperature=0.1)
    np.testing.assert_allclose(sharp, [[np.exp(8) + np.exp(1), np.exp(9), 0.0]])
    assert sharp.argmax() == 1  # the nearest neighbour dominates
    flat = metrics.knn_class_scores(similarities, neighbours, 3, temperature=1.0)
    assert flat.argmax() == 0  # two neighbours outvote one


@pytest.mark.parametrize("call", [
    lambda: metrics.top_k_accuracy(np.zeros((2, 3)), np.array([0, 3]), 1),
    lambda: metrics.clustering_accuracy(np.array([0, 1]), np.array([0, 1, 1])),
    lambda: metrics.adjusted_rand_index(np.array([0, -1]), np.array([0, 1])),
    lambda: metrics.knn_class_scores(np.zeros((1, 2)), np.array([[0, 1]]), 2, 0.0),
])
def test_bad_inputs_are_refused(call):
    with pytest.raises(ValueError):
        call()


def test_intervals_of_an_accuracy_match_its_normal_approximation():
    """Both intervals of a mean of 0/1 hits match p +- 1.96 sqrt(p (1 - p) / n)."""
    n, p = 4000, 0.8
    hits = np.random.default_rng(0).permutation(np.arange(n) < p * n).astype(int)
    half_width = 1.96 * np.sqrt(p * (1 - p) / n)  # 0.0124
    for interval in (metrics.bootstrap_interval, metrics.half_sample_interval):
        low, high = interval(np.mean, (hits,), seed=0)
        assert low < p < high, interval
        assert (high - low) / 2 == pytest.approx(half_width, rel=0.15), interval
    # Seeded: the same samples give the same interval.
    assert metrics.bootstrap_interval(np.mean, (hits,), seed=0) == metrics.bootstrap_interval(
        np.mean, (hits,), seed=0)


def test_paired_interval_of_a_difference_is_narrower_than_unpaired():
    """Two models right on mostly the same images: pairing removes the shared part."""
    rng = np.random.default_rng(1)
    easy = rng.random(2000) < 0.7
    a, b = easy | (rng.random(2000) < 0.05), easy | (rng.random(2000) < 0.02)
    low, high = metrics.bootstrap_interval(lambda x, y: x.mean() - y.mean(), (a, b), seed=0)
    assert low < a.mean() - b.mean() < high and low > 0  # a's extra hits are real
    unpaired = 2 * 1.96 * np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert high - low < unpaired / 2


def test_half_sample_interval_of_nmi_holds_the_figure():
    truth, pred = _random_labellings(0, n=300)
    value = metrics.nmi(truth, pred)
    low, high = metrics.half_sample_interval(metrics.nmi, (truth, pred), seed=0)
    assert low < value < high and 0.01 < high - low < 0.3
    with pytest.raises(ValueError, match="one length"):
        metrics.half_sample_interval(metrics.nmi, (truth, pred[:10]), seed=0)
