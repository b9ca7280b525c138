"""Clustering of features for DeepCluster: PCA whitening, FAISS k-means, PIC, spherical k-means
(DeepCluster-v2), statistics.

Numpy in, numpy out; no TensorFlow. Every random choice takes an explicit seed.
"""

from dc_core.clustering.kmeans import KMeansResult, kmeans, kmeans_reference, split_empty_clusters
from dc_core.clustering.pca import PCAWhitening, fit_pca_whitening, l2_normalize
from dc_core.clustering.pic import pic
from dc_core.clustering.spherical import SphericalKMeansResult, spherical_kmeans
from dc_core.clustering.stats import acceptance_probabilities, cluster_sizes, cluster_table, nmi

__all__ = [
    "KMeansResult",
    "PCAWhitening",
    "acceptance_probabilities",
    "cluster_sizes",
    "cluster_table",
    "fit_pca_whitening",
    "kmeans",
    "kmeans_reference",
    "l2_normalize",
    "nmi",
    "pic",
    "spherical_kmeans",
    "SphericalKMeansResult",
    "split_empty_clusters",
]
