"""Montages of random clusters of an assignment, and the training callback that logs them.

One row per cluster: up to 8 member images under a caption with the cluster's id and size and,
when labels are known, its majority label and purity. Clusters and members are drawn with the
seed (run seed, epoch), so `python -m dc_tf.visualize clusters --epoch=E` redraws exactly the
image the callback logged for epoch E.
"""

from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from dc_core.clustering import cluster_table
from dc_tf import data
from dc_tf.run_dir import RunDir
from dc_tf.visualization import montage
from dc_tf.visualization.trained import load_views

CLUSTERS_SHOWN = 6
IMAGES_PER_CLUSTER = 8
THUMB_SIZE = 64
# A sequentially read source (tfds:) is streamed up to the largest index shown; drawing from
# its first examples only keeps that cheap on ImageNet.
SEQUENTIAL_PREFIX = 5000


def pick_clusters(assignment: np.ndarray, num_clusters: int, per_cluster: int, seed,
                  candidates: Optional[int] = None) -> list:
    """Draws clusters uniformly among the non-empty ones, then members uniformly in each.

    Args:
      assignment: int32 [N] cluster of every example (-1: none).
      num_clusters, per_cluster: how many clusters, and at most how many members of each.
      seed: anything np.random.default_rng takes, e.g. (run seed, epoch).
      candidates: draw only among examples 0 .. candidates-1 (None: all).
    Returns:
      [(cluster id, int64 [<= per_cluster] member indices, increasing)], by cluster id.
    """
    rng = np.random.default_rng(seed)
    pool = assignment[:candidates]
    present = np.unique(pool[pool >= 0])
    chosen = np.sort(rng.choice(present, min(num_clusters, len(present)), replace=False))
    picks = []
    for c in chosen:
        members = np.flatnonzero(pool == c)
        picks.append((int(c), np.sort(rng.choice(members, min(per_cluster, len(members)),
                                                 replace=False))))
    return picks


def caption_text(row: dict, class_names=None) -> str:
    """'cluster 7: 523 images, majority label 3, purity 0.87' from a clustering.cluster_table row;
    with class_names, the label's name ('majority Sneaker')."""
    text = f"cluster {row['cluster']}: {row['size']} images"
    if "purity" in row:
        label = row["majority_label"]
        named = class_names is not None and 0 <= label < len(class_names)
        text += (f", majority {class_names[label]}" if named else f", majority label {label}")
        text += f", purity {row['purity']:.2f}"
    return text


def cluster_montage(source: data.Source, assignment: np.ndarray, seed,
                    num_clusters: int = CLUSTERS_SHOWN, per_cluster: int = IMAGES_PER_CLUSTER,
                    thumb_size: int = THUMB_SIZE) -> np.ndarray:
    """uint8 [H, W, 3]: a captioned row of member thumbnails for each drawn cluster.

    Args:
      source: the images the assignment covers (labels from source.labels when known).
      assignment: int32 [N], N = source.num_examples.
      seed: as in pick_clusters.
      thumb_size: thumbnails are the central square of each image resized to this size.
    """
    if len(assignment) != source.num_examples:
        raise ValueError(f"the assignment covers {len(assignment)} examples but {source.name} "
                         f"has {source.num_examples}; the dataset changed since the run")
    labels = (source.labels if source.labels is not None
              else np.full(len(assignment), -1, np.int64))
    candidates = None if source.random_access else SEQUENTIAL_PREFIX
    picks = pick_clusters(assignment, num_clusters, per_cluster, seed, candidates)
    if not picks:
        raise ValueError("the assignment has no example in any cluster")
    rows = {r["cluster"]: r for r in cluster_table(assignment, labels)}
    wanted = np.concatenate([members for _, members in picks])
    views = load_views(source, wanted, thumb_size, thumb_size, source.channels)
    blank = np.full((thumb_size, thumb_size, 3), montage.BACKGROUND, np.uint8)
    blocks = []
    for c, members in picks:
        thumbs = np.stack([montage.to_rgb(views[i]) if i in views else blank
                           for i in members.tolist()])
        cells = montage.grid(thumbs, per_cluster, cells=per_cluster)
        blocks.append(montage.caption(cells, caption_text(rows[c], source.class_names)))
    return montage.stack(blocks)


class ClusterMontageCallback(keras.callbacks.Callback):
    """Logs `cluster_montage` of each epoch's clustering to MODEL_DIR/logs (image "clusters",
    step = epoch). List it after the ReclusterCallback, which saves the epoch's assignment in its
    on_epoch_begin; drawn with the seed (seed, epoch).

    Args:
      source: the training images.
      model_dir: the run folder (RunDir: its epoch assignments and logs).
      seed: the run's seed.
    """

    def __init__(self, source: data.Source, model_dir: str, seed: int):
        super().__init__()
        self.source, self.run, self.seed = source, RunDir(model_dir), seed
        self.writer = None

    def on_train_begin(self, logs=None):
        self.writer = tf.summary.create_file_writer(self.run.logs)

    def on_epoch_begin(self, epoch, logs=None):
        assignment = self.run.load_assignment(epoch)
        image = cluster_montage(self.source, assignment, (self.seed, epoch))
        montage.write_images(self.writer, "clusters", [image], epoch,
                             f"{CLUSTERS_SHOWN} random clusters of epoch {epoch}")

    def on_train_end(self, logs=None):
        self.writer.close()
