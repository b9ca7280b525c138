"""The streamed feature pass: PCA fitted on the head of the stream, every row whitened by index."""

import numpy as np
import pytest
import tensorflow as tf
import threadpoolctl

from dc_core import clustering
from dc_tf.features import extract_features


def _stream(features: np.ndarray, order: np.ndarray, batch: int) -> tf.data.Dataset:
    """Batches of (images, indices, labels) in `order`; the "images" are the features."""
    labels = np.arange(len(features)) % 3
    return tf.data.Dataset.from_tensor_slices(
        (features[order], order.astype(np.int64), labels[order].astype(np.int64))).batch(batch)


def _identity(images):
    return tf.identity(images)


@pytest.mark.parametrize("pca_sample", [40, 64, 1000])  # inside a batch, on a boundary, > N
def test_pca_is_fitted_on_the_head_of_the_stream_and_applied_to_every_row(pca_sample):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((100, 12)).astype(np.float32) * np.arange(1, 13)
    order = rng.permutation(100)[:90]  # 10 examples "failed to decode"
    result = extract_features(_identity, _stream(features, order, batch=16), 100, pca_dim=5,
                              pca_sample=pca_sample)

    head = order[:min(pca_sample, len(order))]
    expected_pca = clustering.fit_pca_whitening(features[head], 5)
    np.testing.assert_allclose(result.pca.matrix, expected_pca.matrix, rtol=1e-4, atol=1e-5)
    expected = clustering.l2_normalize(expected_pca.apply(features[order]))
    np.testing.assert_allclose(result.features[order], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.sort(result.missing), np.setdiff1d(np.arange(100), order))
    assert not result.features[result.missing].any()
    np.testing.assert_array_equal(result.labels[order], order % 3)


def test_without_pca_rows_are_only_normalised():
    features = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    order = np.arange(30)
    result = extract_features(_identity, _stream(features, order, batch=7), 30, pca_dim=0,
                              pca_sample=0)
    assert result.pca is None
    np.testing.assert_allclose(result.features, clustering.l2_normalize(features), rtol=1e-6)


def _blas_threads() -> list:
    return [pool["num_threads"] for pool in threadpoolctl.threadpool_info()
            if pool["user_api"] == "blas"]


# The sample fills inside the loop (40), or the stream ends first (1000 > the 90 readable rows).
@pytest.mark.parametrize("pca_sample", [40, 1000])
def test_the_pca_fit_gets_every_blas_thread_and_the_batches_one(monkeypatch, pca_sample):
    # The per-batch numpy work runs on one BLAS thread (spinning idle threads take the cores
    # from the network); the once-per-pass PCA fit must not inherit that limit.
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        if not _blas_threads() or max(_blas_threads()) < 2:
            pytest.skip("no BLAS library that threadpoolctl can set to 2 threads")
        seen = {}
        fit = clustering.fit_pca_whitening

        def recording_fit(x, dim):
            seen["fit"] = _blas_threads()
            return fit(x, dim)

        def recording_infer(images):
            seen.setdefault("batches", _blas_threads())
            return tf.identity(images)

        monkeypatch.setattr(clustering, "fit_pca_whitening", recording_fit)
        features = np.random.default_rng(2).standard_normal((100, 12)).astype(np.float32)
        extract_features(recording_infer, _stream(features, np.arange(90), batch=16), 100,
                         pca_dim=5, pca_sample=pca_sample)
    assert set(seen["fit"]) == {2}
    assert set(seen["batches"]) == {1}
