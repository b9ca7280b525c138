"""TensorBoard embedding projector files: a checkpoint holding the features, a metadata TSV and a
sprite image, tied together by projector_config.pbtxt (tensorboard.plugins.projector).

TensorBoard reads projector_config.pbtxt in each run folder (one that holds event files) and,
with no checkpoint path in it, the latest checkpoint of that folder; file paths in it are relative
to it, so the folder can be moved or copied elsewhere for viewing.
"""

import math
import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins import projector

from dc_core import fileio
from dc_tf.visualization import montage

SPRITE_MAX_SIZE = 8192  # TensorBoard's limit on each side of a sprite image
CHECKPOINT_NAME = "projector"


def sprite_columns(n: int) -> int:
    """Thumbnails per row of a square-ish sprite holding n."""
    return max(1, math.ceil(math.sqrt(n)))


def tensor_name(name: str) -> str:
    """The name under which a tf.train.Checkpoint(**{name: variable}) stores the variable."""
    return f"{name}/.ATTRIBUTES/VARIABLE_VALUE"


def write_metadata(path: str, columns: dict) -> None:
    """One header line and one line per point; tabs and newlines in values become spaces."""
    names = list(columns)
    rows = zip(*(columns[name] for name in names))
    with fileio.atomic_open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(names) + "\n")
        for row in rows:
            f.write("\t".join(" ".join(str(v).split()) for v in row) + "\n")


def write_projector(logdir: str, name: str, features: np.ndarray, columns: dict,
                    thumbnails: np.ndarray) -> str:
    """Writes one embedding for TensorBoard's projector into logdir; returns the config's path.

    Args:
      logdir: a TensorBoard run folder (the caller writes some summary there, so that
        TensorBoard lists it as a run).
      name: the embedding's name in the projector (e.g. the layer).
      features: float32 [n, d], one row per point.
      columns: metadata, column name -> n values (e.g. index, cluster, label).
      thumbnails: uint8 [n, s, s, C], the sprite's images, in the order of the rows.
    """
    n, s = len(features), thumbnails.shape[1]
    if sprite_columns(n) * s > SPRITE_MAX_SIZE:
        raise ValueError(f"a sprite of {n} images of {s} px exceeds TensorBoard's "
                         f"{SPRITE_MAX_SIZE} px; use fewer images or smaller thumbnails")
    for column, values in columns.items():
        if len(values) != n:
            raise ValueError(f"metadata column {column} has {len(values)} values for {n} points")
    os.makedirs(logdir, exist_ok=True)
    checkpoint = tf.train.Checkpoint(**{name: tf.Variable(features.astype(np.float32))})
    # The manager also writes the `checkpoint` index TensorBoard looks for, with relative paths,
    # and replaces the previous projector's files.
    tf.train.CheckpointManager(checkpoint, logdir, max_to_keep=1,
                               checkpoint_name=CHECKPOINT_NAME).save(checkpoint_number=0)
    write_metadata(os.path.join(logdir, "metadata.tsv"), columns)
    columns = sprite_columns(n)  # TensorBoard wants as many rows as columns, filled row-first
    montage.save_png(os.path.join(logdir, "sprite.png"),
                     montage.grid(thumbnails, columns, pad=0, cells=columns * columns))
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = tensor_name(name)
    embedding.metadata_path = "metadata.tsv"
    embedding.sprite.image_path = "sprite.png"
    embedding.sprite.single_image_dim.extend([s, s])
    # What projector.visualize_embeddings writes (the config in text format), atomically.
    path = os.path.join(logdir, "projector_config.pbtxt")
    fileio.atomic_write(path, str(config))
    return path
