r"""Balanced sampler at ImageNet size: one epoch of accepted indices, timed (issue 8, item 5).

    python bench/sampler.py                    # N = 1,281,167, k = 10,000, Zipf sizes
    python bench/sampler.py --num_examples=100000 --num_clusters=1000

Builds a pseudo-labelling with Zipf-skewed cluster sizes whose smallest cluster has one image
(the worst case for rejection sampling: the acceptance rate is n_min * k / N), then draws one
epoch (N accepted indices) from `dc_tf.data.sampler.accepted_pairs` exactly as training does,
minus the decoding. Prints JSON: seconds, proposals per accepted index, and how uniform the
clusters of the accepted indices are (each cluster's share vs 1/k).
"""

import argparse
import json
import time

import numpy as np
import tensorflow as tf

from dc_core.clustering import acceptance_probabilities
from dc_core.sources import ArraySource
from dc_tf.data.sampler import accepted_pairs, stream_key


def zipf_labels(num_examples: int, num_clusters: int, seed: int = 0) -> np.ndarray:
    """int32 [N] labels, cluster c of size ~ 1/(c+1), the smallest of size 1, shuffled."""
    weights = 1.0 / np.arange(1, num_clusters + 1)
    sizes = np.maximum(1, np.floor(weights / weights.sum() * num_examples)).astype(np.int64)
    sizes[-1] = 1
    sizes[0] += num_examples - sizes.sum()  # the largest absorbs the rounding
    labels = np.repeat(np.arange(num_clusters, dtype=np.int32), sizes)
    return np.random.default_rng(seed).permutation(labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=1_281_167)
    parser.add_argument("--num_clusters", type=int, default=10_000)
    args = parser.parse_args()
    n, k = args.num_examples, args.num_clusters

    labels = zipf_labels(n, k)
    accept = acceptance_probabilities(labels, k).astype(np.float32)
    # Indices only: the benchmark never decodes, so the source holds no images.
    source = ArraySource("bench", n, 1, None, images=np.zeros((1, 1, 1, 1), np.uint8))
    pairs = accepted_pairs(source, tf.Variable(labels), tf.Variable(accept),
                         stream_key(0, epoch=0))
    # The sampler's own output, batched straight away: any per-element work downstream (the
    # training pipeline's decode map) belongs to the input pipeline (bench/input_pipeline.py).
    batch = 65536
    batches = pairs.batch(batch).take(-(-n // batch))

    start = time.time()
    drawn = np.concatenate([index.numpy() for index, _ in batches])[:n]
    seconds = time.time() - start

    counts = np.bincount(labels[drawn], minlength=k)
    sizes = np.bincount(labels, minlength=k)
    expected = accept @ sizes  # sum over clusters of n_c * p_c = k * n_min
    print(json.dumps({
        "num_examples": n, "num_clusters": k, "smallest_cluster": int(sizes.min()),
        "largest_cluster": int(sizes.max()), "acceptance_rate": float(expected / n),
        "seconds_per_epoch_of_indices": round(seconds, 2),
        "accepted_indices": int(drawn.size),
        "cluster_share_min_max_vs_uniform": [float(counts.min() * k / n),
                                             float(counts.max() * k / n)],
        "rejected_indices_returned": int((accept[labels[drawn]] == 0).sum()),
    }))


if __name__ == "__main__":
    main()
