r"""Input pipeline vs training step: is the model ever waiting for images? (issue 8, item 2)

    python bench/input_pipeline.py                       # Fashion-MNIST (in memory) + a JPEG folder
    python bench/input_pipeline.py --folder_images=5000

For each source, times the real training input pipeline alone (`pipelines.training_dataset`:
balanced sampling, decode, random resized crop, flip, batch, prefetch; no model) over a few
hundred batches, then trains the same configuration for 2 epochs with `dc_tf.train.run` and
reads the second epoch's `train_images_per_s` from the run's metrics. Prints one JSON line per
source with both rates and their ratio (the target: input >= 2x training).

Sources: Fashion-MNIST as `flags/fashion_mnist.cfg` trains it (uint8 array in memory, 32 px),
and a folder of generated 128x96 RGB JPEGs in 10 class folders trained at 64 px (small_vgg).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def input_rate(cfg, batches: int) -> float:
    """Images/s of the training pipeline alone, after 10 warm-up batches."""
    import tensorflow as tf

    from dc_tf import data
    from dc_tf.data import pipelines

    source = data.open_source(cfg.dataset, cfg.data_dir, cfg.max_examples)
    labels = tf.Variable(np.arange(source.num_examples, dtype=np.int32) % cfg.num_clusters)
    accept = tf.Variable(np.ones(cfg.num_clusters, np.float32))
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = pipelines.training_dataset(source, labels, accept, epoch, cfg.image_size,
                                    cfg.crop_scale, cfg.crop_ratio, cfg.batch_size,
                                    steps=batches + 10, seed=cfg.seed)
    it = iter(ds)
    for _ in range(10):
        next(it)
    start = time.time()
    for _ in range(batches):
        next(it)
    return batches * cfg.batch_size / (time.time() - start)


def train_rate(cfg) -> float:
    """train_images_per_s of the second epoch of a real 2-epoch run."""
    from dc_tf import train
    from dc_tf.run_dir import RunDir

    train.run(cfg)
    return RunDir(cfg.model_dir).read_metrics()[1]["train_images_per_s"]


def write_folder(root: str, count: int) -> str:
    from conftest import write_image
    for i in range(count):
        write_image(os.path.join(root, f"class{i % 10}", f"img{i:05d}.jpg"), (128, 96), "RGB",
                    seed=i)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--folder_images", type=int, default=3000)
    parser.add_argument("--fashion_examples", type=int, default=20000)
    args = parser.parse_args()

    from conftest import config_from_flagfile

    tmp = tempfile.mkdtemp(prefix="dc_tf_input_bench_")
    folder = write_folder(os.path.join(tmp, "images"), args.folder_images)
    setups = {
        "in_memory_fashion_mnist_32px": config_from_flagfile(
            "fashion_mnist.cfg", f"--max_examples={args.fashion_examples}", "--epochs=2",
            f"--model_dir={tmp}/fashion"),
        "jpeg_folder_64px": config_from_flagfile(
            "fashion_mnist.cfg", f"--dataset=folder:{folder}", "--image_size=64",
            "--resize_size=73", "--mean=0.5", "--std=0.25", "--num_clusters=30",
            "--epochs=2", f"--model_dir={tmp}/folder"),
    }
    for name, cfg in setups.items():
        pipeline = input_rate(cfg, args.batches)
        training = train_rate(cfg)
        print(json.dumps({"source": name, "batch_size": cfg.batch_size,
                          "input_images_per_s": round(pipeline, 1),
                          "train_images_per_s": round(training, 1),
                          "input_over_train": round(pipeline / training, 2)}), flush=True)


if __name__ == "__main__":
    main()
