"""PCA whitening and row L2 normalisation of the features before clustering.

DeepCluster reduces the 4096-d fc7 features to 256 dimensions with a whitening PCA
(`faiss.PCAMatrix(4096, 256, eigen_power=-0.5)`), then L2-normalises each row
(docs/protocols.md §2).
"""

import dataclasses

import numpy as np

# Rows per block of the covariance accumulation.
_BLOCK_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class PCAWhitening:
    """A fitted whitening PCA: `apply(x) = (x - mean) @ matrix`.

    Attributes:
        mean: float32 [D], the mean of the fitting features.
        matrix: float32 [D, d], the top-d eigenvectors as columns, by decreasing eigenvalue, each
            divided by sqrt(eigenvalue + eps).
    """

    mean: np.ndarray
    matrix: np.ndarray

    @property
    def input_dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def output_dim(self) -> int:
        return self.matrix.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Projects and whitens features.

        Args:
            x: float [n, D] features, D = input_dim.

        Returns:
            float32 [n, d] whitened features, d = output_dim.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"PCA was fitted on {self.input_dim}-d features but got an array of shape "
                f"{x.shape}; pass features of the layer it was fitted on")
        return ((x.astype(np.float32) - self.mean) @ self.matrix).astype(np.float32)


def fit_pca_whitening(x: np.ndarray, dim: int, eps: float = 1e-8) -> PCAWhitening:
    """Fits a whitening PCA, like `faiss.PCAMatrix(D, dim, eigen_power=-0.5)`.

    Computed in float64. The covariance divides by n (not n - 1), as FAISS does, so the whitened
    fitting features have identity covariance on every component whose eigenvalue is well
    above eps.

    Args:
        x: float [n, D] features.
        dim: number of components kept, 1 <= dim <= min(D, n).
        eps: added to each eigenvalue before the inverse square root, so (near-)zero-variance
            directions do not divide by zero.

    Returns:
        A PCAWhitening with float32 mean [D] and matrix [D, dim].
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"PCA expects features of shape [n, D], got {x.shape}")
    n, width = x.shape
    if dim < 1:
        raise ValueError(f"--pca_dim={dim} must be at least 1")
    if dim > width:
        raise ValueError(f"--pca_dim={dim} exceeds the feature width D={width}; lower --pca_dim")
    if n < dim:
        raise ValueError(
            f"PCA needs at least pca_dim examples: --pca_dim={dim} but only {n} examples; "
            "lower --pca_dim or add data")
    # In float64 but by blocks of rows: no float64 copy of x (50,000 x 4096 would be 1.6 GB).
    mean = np.zeros(width, np.float64)
    for first in range(0, n, _BLOCK_ROWS):
        block = x[first:first + _BLOCK_ROWS]
        if not np.all(np.isfinite(block)):
            raise ValueError(
                "the features contain NaN or Inf (training has likely diverged); "
                "lower the learning rate")
        mean += block.sum(axis=0, dtype=np.float64)
    mean /= n
    cov = np.zeros((width, width), np.float64)
    for first in range(0, n, _BLOCK_ROWS):
        centred = x[first:first + _BLOCK_ROWS].astype(np.float64) - mean
        cov += centred.T @ centred
    cov /= n
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1][:dim]
    # Round-off can make zero eigenvalues slightly negative; clamp so the square root is real.
    eigenvalues = np.maximum(eigenvalues[order], 0.0)
    eigenvectors = eigenvectors[:, order]
    # eigh's signs are arbitrary; making the largest-magnitude entry of each eigenvector positive
    # gives the same projection for the same data on every machine.
    peak = np.argmax(np.abs(eigenvectors), axis=0)
    signs = np.sign(eigenvectors[peak, np.arange(dim)])
    eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
    matrix = eigenvectors / np.sqrt(eigenvalues + eps)
    return PCAWhitening(mean=mean.astype(np.float32), matrix=matrix.astype(np.float32))


def l2_normalize(x: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Scales each row to unit L2 norm.

    Args:
        x: float [n, d].
        eps: added to each norm so all-zero rows stay zero instead of becoming NaN.

    Returns:
        float32 [n, d].
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"l2_normalize expects shape [n, d], got {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / (norms + eps)).astype(np.float32)
