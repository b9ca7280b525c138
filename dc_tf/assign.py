r"""Put new images into the clusters a run learnt, with the export alone.

    python -m dc_tf.assign --model=runs/fashion_mnist/export --input=folder:/data/new \
        --output=/tmp/assigned.csv

Writes `file,cluster,distance` per image (the export's `assign` signature: nearest centroid of
the final clustering, L2 distance in the whitened space). Images get the feature pass's view:
resize the shorter side (to the run's --resize_size, read from config.json beside the export when
there is one), centre crop, rounded to uint8. Unreadable files are skipped, counted and listed in
FILE.skipped.tsv.
"""

import csv
import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from dc_core import fileio
from dc_core import transforms
from dc_tf import data
from dc_tf.data import pipelines


def _resize_size(model: str, image_size: int) -> int:
    path = os.path.join(os.path.dirname(os.path.abspath(model)), "config.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["resize_size"]
    return transforms.default_resize_size(image_size)


def assign_images(model: str, dataset: str, output: str, batch_size: int = 256) -> dict:
    """Assigns every image of `dataset` to a cluster; writes the CSV, returns counts.

    Args:
      model: path of a dc_tf export with an `assign` signature.
      dataset: any --dataset value (folder:PATH for new images).
      output: CSV path; unreadable files go to output + ".skipped.tsv".
    """
    loaded = tf.saved_model.load(model)
    if "assign" not in loaded.signatures:
        raise ValueError(f"--model={model} has no `assign` signature (signatures: "
                         f"{sorted(loaded.signatures)}); re-export it with this version of dc_tf")
    assign = loaded.signatures["assign"]
    _, size, _, channels = assign.structured_input_signature[1]["images"].shape
    source = data.open_source(dataset)
    ds = pipelines.feature_dataset(source, _resize_size(model, size), size, batch_size)
    bar = keras.utils.Progbar(source.num_examples, unit_name="image")
    seen = np.zeros(source.num_examples, bool)
    with fileio.atomic_open(output, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "cluster", "distance"])
        for images, indices, _ in ds:
            if images.shape[-1] != channels:  # colour files into a grayscale model, or back
                images = (tf.image.rgb_to_grayscale(images) if channels == 1
                          else tf.image.grayscale_to_rgb(images))
            pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
            out = assign(images=pixels)
            for i, c, d in zip(indices.numpy(), out["cluster"].numpy(), out["distance"].numpy()):
                writer.writerow([source.describe(int(i)), int(c), f"{d:.6f}"])
            seen[indices.numpy()] = True
            bar.add(len(indices))
    skipped = np.flatnonzero(~seen)
    if len(skipped):
        data.write_skipped(source, skipped, output + ".skipped.tsv")
        logging.warning("%d unreadable files skipped, listed in %s.skipped.tsv", len(skipped),
                        output)
    return {"assigned": int(seen.sum()), "skipped": int(len(skipped))}


FLAGS = flags.FLAGS


def _define_flags():
    """Flags exist only when this module is the program, not when it is imported."""
    flags.DEFINE_string("model", None, "MODEL_DIR/export of a training run.")
    flags.DEFINE_string("input", None, "Images to assign: folder:PATH (or any --dataset value).")
    flags.DEFINE_string("output", None, "CSV file to write.")
    flags.DEFINE_integer("batch_size", 256, "Images per batch.")


def main(argv):
    del argv
    try:
        counts = assign_images(FLAGS.model, FLAGS.input, FLAGS.output, FLAGS.batch_size)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"assigned {counts['assigned']} images, skipped {counts['skipped']} unreadable; "
          f"wrote {FLAGS.output}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["model", "input", "output"])
    app.run(main)
