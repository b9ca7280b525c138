r"""k-means at ImageNet size: exact FAISS vs the fast modes (issue 8, item 4).

    python bench/kmeans.py                                  # N = 1,281,167, d = 256, k = 10,000
    python bench/kmeans.py --modes=shortlist,exact,two_level
    python bench/kmeans.py --num_examples=100000 --num_clusters=1000 --niter=10
    python bench/kmeans.py --features=embeddings.npy --num_clusters=1000
    python bench/kmeans.py --use_gpu                        # FAISS on every visible GPU (faiss-gpu)

Features: a synthetic stand-in for DeepCluster's PCA-whitened, L2-normalised 256-d features, a
mixture of --num_clusters Gaussian blobs (centres N(0, I), within-blob deviation --spread)
projected onto the unit sphere; or real features from a .npy file (--features, e.g. the
`embedding` output of an export's `assign` signature over a dataset). Every mode runs
`dc_core.clustering.kmeans` with the same seed and iterations. Prints JSON: seconds per mode, each
assignment's objective (sum of squared distances of every example to its returned cluster's
returned centroid, computed here in float64), and for each mode besides exact its speed-up over
exact, the relative gap of its objective and the NMI between its assignment and exact's (with
--reseeded_reference, also between two exact runs of different seeds: k-means has many local
optima, so that NMI is the ceiling any other method can be held to).
"""

import argparse
import json
import time

import numpy as np

from dc_core import clustering


def blobs(num_examples: int, num_clusters: int, dim: int, spread: float, seed: int) -> np.ndarray:
    """float32 [N, dim] unit-norm rows from num_clusters Gaussian blobs of random sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    which = rng.integers(0, num_clusters, num_examples)
    x = np.empty((num_examples, dim), np.float32)
    for start in range(0, num_examples, 100_000):  # in chunks: no second N x dim temporary
        part = which[start:start + 100_000]
        x[start:start + len(part)] = centres[part] + spread * rng.standard_normal(
            (len(part), dim), dtype=np.float32)
    return clustering.l2_normalize(x)


def objective(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    total = 0.0
    for start in range(0, len(x), 100_000):
        rows = slice(start, start + 100_000)
        diff = x[rows].astype(np.float64) - centroids[labels[rows]]
        total += float((diff * diff).sum())
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=1_281_167)
    parser.add_argument("--num_clusters", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--modes", default="exact,shortlist")
    parser.add_argument("--features", default="",
                        help="a float32 [N, d] .npy of real features to cluster instead of blobs")
    parser.add_argument("--use_gpu", action="store_true",
                        help="run FAISS on every visible GPU (needs faiss-gpu); default: the CPU")
    parser.add_argument("--reseeded_reference", action="store_true",
                        help="also run exact k-means with seed + 1 and report its NMI with the "
                             "first exact run")
    args = parser.parse_args()

    if args.features:
        x = clustering.l2_normalize(np.load(args.features))
        data = {"features": args.features}
    else:
        x = blobs(args.num_examples, args.num_clusters, args.dim, args.spread, args.seed)
        data = {"spread": args.spread}
    out = {"device": "gpu" if args.use_gpu else "cpu", "num_examples": len(x),
           "num_clusters": args.num_clusters, "dim": x.shape[1], "niter": args.niter, **data}
    results = {}
    for mode in args.modes.split(","):
        start = time.time()
        result = clustering.kmeans(x, args.num_clusters, seed=args.seed, niter=args.niter,
                                   use_gpu=args.use_gpu, mode=mode)
        out[f"{mode}_seconds"] = round(time.time() - start, 1)
        out[f"{mode}_objective"] = objective(x, result.labels, result.centroids)
        out[f"{mode}_empty_clusters_repaired"] = result.empty_clusters
        results[mode] = result
        print(json.dumps({k: v for k, v in out.items() if k.startswith(mode)}), flush=True)
    if args.reseeded_reference:  # how much two exact runs agree: NMI's ceiling on this data
        other = clustering.kmeans(x, args.num_clusters, seed=args.seed + 1, niter=args.niter,
                                  use_gpu=args.use_gpu)
        out["nmi_exact_vs_exact_other_seed"] = clustering.nmi(other.labels,
                                                              results["exact"].labels)
    for mode in results.keys() - {"exact"} if "exact" in results else ():
        out[f"{mode}_speedup"] = round(out["exact_seconds"] / out[f"{mode}_seconds"], 2)
        out[f"{mode}_objective_gap"] = out[f"{mode}_objective"] / out["exact_objective"] - 1
        out[f"{mode}_nmi_vs_exact"] = clustering.nmi(results[mode].labels,
                                                     results["exact"].labels)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
