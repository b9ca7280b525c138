"""Top-activating images of channels (docs/protocols.md §7): every image of a dataset is scored by a
channel's spatial mean activation (post-ReLU), and the top 9 per channel are kept."""

import keras
import numpy as np
import tensorflow as tf

from dc_tf.visualization.trained import Progress

TOP_K = 9


class TopK:
    """The k highest scores seen per channel, kept while a dataset streams past (memory O(K·k)).

    Ties go to the lower example index, so the result does not depend on the batching.
    """

    def __init__(self, num_channels: int, k: int):
        self.k = k
        self.scores = np.empty((num_channels, 0), np.float32)
        self.indices = np.empty((num_channels, 0), np.int64)

    def update(self, scores: np.ndarray, indices: np.ndarray) -> None:
        """scores: float32 [B, K] of the examples `indices` (int64 [B])."""
        s = np.concatenate([self.scores, scores.T], axis=1)
        i = np.concatenate([self.indices, np.broadcast_to(indices, scores.T.shape)], axis=1)
        order = np.lexsort((i, -s), axis=1)[:, :self.k]
        self.scores = np.take_along_axis(s, order, axis=1)
        self.indices = np.take_along_axis(i, order, axis=1)

    def result(self) -> tuple:
        """(indices int64 [K, <=k], scores float32 [K, <=k]), best first."""
        return self.indices, self.scores


def channel_means(activations: tf.Tensor, channels: tf.Tensor) -> tf.Tensor:
    """[B, h, w, C] or [B, C] activations -> float32 [B, K] (spatial mean) of `channels`."""
    if activations.shape.rank == 4:
        activations = tf.reduce_mean(activations, axis=[1, 2])
    return tf.gather(activations, channels, axis=1)


def top_images(backbone: keras.Model, layer: str, channels, dataset: tf.data.Dataset,
               total: int, k: int = TOP_K) -> tuple:
    """The k examples of `dataset` with the highest mean activation of each channel.

    Args:
      dataset: batches of (float32 images [B, S, S, C], int64 indices [B], labels), e.g.
        `trained.view_dataset`.
      total: number of examples, for progress messages.
    Returns:
      (indices int64 [K, k], scores float32 [K, k]), best first, for K = len(channels).
    """
    net = keras.Model(backbone.input, backbone.output[layer])
    targets = tf.constant(np.asarray(channels, np.int32))

    @tf.function(reduce_retracing=True)
    def score(images):
        return channel_means(net(images, training=False), targets)

    best = TopK(len(channels), k)
    progress = Progress(f"scoring {layer} channels", total)
    for images, indices, _ in dataset:
        best.update(score(images).numpy(), indices.numpy())
        progress.update(int(indices.shape[0]))
    return best.result()
