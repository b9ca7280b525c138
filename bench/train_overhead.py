r"""The cost of the DeepCluster machinery: DeepCluster training vs a plain keras.Model.fit.

Trains the Fashion-MNIST default (flags/fashion_mnist.cfg) for a few epochs, then fits the same
backbone + Dense(k) top layer with plain `compile()`/`fit()` on fixed random labels, with the same
batch size, augmentation and number of steps. Prints one JSON object: per-phase times of every
DeepCluster epoch, its training images/s, and the plain fit's images/s (both taken after the first,
warm-up epoch).

    python bench/train_overhead.py                        # 60,000 images, 3 epochs
    python bench/train_overhead.py --max_examples=10000   # quicker; any training flag works
"""

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def plain_fit(cfg, epochs: int) -> float:
    """Images/s of a plain fit() of the same network on fixed labels, after one warm-up epoch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from dc_tf import data, models
    from dc_core import transforms

    source = data.open_source(cfg.dataset, cfg.data_dir, cfg.max_examples)
    # The same precision as the DeepCluster run (a float32 top layer, as DeepClusterModel's).
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if cfg.mixed_precision
                                            else "float32")
    backbone = models.build_backbone(cfg.arch, cfg.image_size, source.channels, cfg.sobel,
                                     cfg.mean, cfg.std, seed=cfg.seed)
    inputs = keras.Input(backbone.input_shape[1:])
    logits = keras.layers.Dense(cfg.num_clusters, dtype="float32")(
        backbone(inputs)[models.head_endpoint(cfg.arch)])
    model = keras.Model(inputs, logits)
    model.compile(keras.optimizers.SGD(cfg.learning_rate, momentum=cfg.momentum),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=cfg.jit_compile)
    labels = np.random.default_rng(0).integers(0, cfg.num_clusters, source.num_examples)
    n = source.num_examples
    ds = tf.data.Dataset.range(n).shuffle(n).repeat().enumerate().map(
        lambda position, i: (transforms.random_resized_crop(
            source.decode(i, i), cfg.image_size, cfg.crop_scale, cfg.crop_ratio,
            seed=tf.stack([tf.constant(cfg.seed, tf.int64), position])), tf.gather(labels, i)),
        num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(cfg.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    steps = -(-n // cfg.batch_size)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.time() - self.start)

    model.fit(ds, epochs=epochs, steps_per_epoch=steps, callbacks=[Timer()], shuffle=False,
              verbose=0)
    return steps * cfg.batch_size * (epochs - 1) / sum(times[1:])


def main(argv):
    from dc_tf import train, train_flags
    from dc_tf.run_dir import RunDir

    os.chdir(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_flags.config_from_argv(
            [argv[0], "--flagfile=flags/fashion_mnist.cfg", "--epochs=3", *argv[1:],
             f"--model_dir={tmp}/run"])
        start = time.time()
        cfg = train.run(cfg)
        total = time.time() - start
        rows = RunDir(cfg.model_dir).read_metrics()
    warm = rows[1:]
    dc_rate = sum(r["train_images_per_s"] for r in warm) / len(warm)
    plain_rate = plain_fit(cfg, cfg.epochs)
    print(json.dumps({
        "benchmark": "train_overhead",
        "command": "python bench/train_overhead.py " + " ".join(argv[1:]),
        "num_examples": cfg.num_examples,
        "epochs": cfg.epochs,
        "total_s": round(total, 1),
        "epochs_detail": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                           if k in ("epoch", "time_features_s", "time_cluster_s", "time_train_s",
                                    "train_images_per_s", "nmi_prev", "nmi_labels")}
                          for r in rows],
        "deepcluster_train_images_per_s": round(dc_rate, 1),
        "plain_fit_images_per_s": round(plain_rate, 1),
        "overhead_percent": round(100 * (plain_rate / dc_rate - 1), 1),
    }, indent=1))


if __name__ == "__main__":
    main(sys.argv)
