r"""The feature pass: its cost over plain batched inference, and its peak memory (issue 8, item 3).

    python bench/feature_pass.py --mode=default        # Fashion-MNIST default, small_vgg, 60,000
    python bench/feature_pass.py --mode=imagenet_size --repeats=1   # N = 1,281,167, 4096-d

Both modes read the real feature pipeline (`pipelines.feature_dataset`: every example once, in
the run's random order, centre-cropped, batches of 256) and time, after tracing, --repeats
alternated rounds of:
  plain: `backbone(images, training=False)` for every batch, nothing kept (batched inference);
  plain folded: the same through `models.FoldedBackbone` (batch normalisation folded into the
    convolutions), the network a reclustering runs;
  feature pass: `dc_tf.features.extract_features` on the folded network, as a reclustering runs
    it (PCA-whitening to --pca_dim fitted on the first --pca_sample examples, every row
    projected, L2-normalised and stored by index).
`default` uses the default run's backbone (random initialisation: the cost does not depend on
the weights). `imagenet_size` uses a cheap synthetic backbone (4 x 4 uint8 images -> Dense(4096)),
so its time is dominated by the feature pass's own work; it measures the peak resident memory of
the process (ru_maxrss, everything included) against the target N x pca_dim x 4 bytes + 2 GiB.
Prints JSON.
"""

import argparse
import json
import os
import resource
import time

import keras
import numpy as np
import tensorflow as tf

from dc_core.sources import ArraySource
from dc_tf import data, models, train_flags
from dc_tf.data import pipelines
from dc_tf.features import extract_features

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def default_setup(seed: int):
    os.chdir(ROOT)  # the flagfiles include each other by relative paths
    cfg = train_flags.config_from_argv(
        ["bench", "--flagfile=flags/fashion_mnist.cfg", "--model_dir=unused"])
    source = data.open_source(cfg.dataset, cfg.data_dir, cfg.max_examples)
    backbone = models.build_backbone(cfg.arch, cfg.image_size, source.channels, cfg.sobel,
                                     cfg.mean, cfg.std, seed=seed)
    return (source, backbone, models.cluster_endpoint(cfg.arch), cfg.resize_size,
            cfg.image_size, cfg.pca_dim, cfg.pca_sample)


def synthetic_setup(num_examples: int, seed: int):
    source = ArraySource("synthetic", num_examples, 1, None,
                         images=np.random.default_rng(seed).integers(
                             0, 256, (num_examples, 4, 4, 1), dtype=np.uint8))
    inputs = keras.Input((4, 4, 1))
    fc = keras.layers.Dense(4096, activation="relu")(keras.layers.Flatten()(inputs))
    return source, keras.Model(inputs, {"fc": fc}), "fc", 4, 4, 256, 50_000


def inference(network, endpoint):
    @tf.function
    def infer(images):
        return tf.cast(network(images, training=False)[endpoint], tf.float32)
    return infer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["default", "imagenet_size"], default="default")
    parser.add_argument("--num_examples", type=int, default=1_281_167,
                        help="imagenet_size only")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternated (plain, feature pass) rounds; medians are compared")
    args = parser.parse_args()

    if args.mode == "default":
        setup = default_setup(args.seed)
    else:
        setup = synthetic_setup(args.num_examples, args.seed)
    source, backbone, endpoint, resize, size, pca_dim, pca_sample = setup
    plain_infer = inference(backbone, endpoint)
    folded_infer = inference(models.FoldedBackbone(backbone).network, endpoint)
    n = source.num_examples
    order = np.random.default_rng(args.seed).permutation(n)

    def dataset():
        return pipelines.feature_dataset(source, resize, size, args.batch_size, order)

    def plain(infer):
        start = time.time()
        for images, _, _ in dataset():
            infer(images).numpy()
        return time.time() - start

    def feature_pass():
        start = time.time()
        result = extract_features(folded_infer, dataset(), n, pca_dim, pca_sample,
                                  log_every_s=1e9)
        return time.time() - start, result

    for images, _, _ in dataset().take(2):  # warm-up: tracing
        plain_infer(images).numpy()
        folded_infer(images).numpy()
    # Alternated, so that a slow stretch of a shared machine does not land on one side only.
    plain_runs, folded_runs, pass_runs = [], [], []
    for _ in range(args.repeats):
        plain_runs.append(plain(plain_infer))
        folded_runs.append(plain(folded_infer))
        rss_plain = peak_rss_bytes()
        seconds, result = feature_pass()
        pass_runs.append(seconds)
    plain_s, pass_s = float(np.median(plain_runs)), float(np.median(pass_runs))
    folded_s = float(np.median(folded_runs))
    out = {"mode": args.mode, "num_examples": n, "feature_dim": int(result.pca.input_dim),
           "pca_dim": pca_dim, "pca_sample": pca_sample,
           "plain_inference_s": [round(s, 2) for s in plain_runs],
           "plain_folded_inference_s": [round(s, 2) for s in folded_runs],
           "feature_pass_s": [round(s, 2) for s in pass_runs],
           "feature_pass_overhead_of_medians": round(pass_s / plain_s - 1, 4),
           "feature_pass_overhead_over_folded_inference": round(pass_s / folded_s - 1, 4),
           "peak_rss_gib_after_plain": round(rss_plain / GIB, 3),
           "peak_rss_gib": round(peak_rss_bytes() / GIB, 3),
           "memory_target_gib": round((n * pca_dim * 4 + 2 * GIB) / GIB, 3),
           "rows_stored": int(result.present.sum())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
