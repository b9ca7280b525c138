"""An inference copy of a backbone with every batch normalisation folded into its convolution.

In inference mode a Conv2D followed by BatchNormalization computes one affine map per output
channel after the convolution, so the pair equals a single Conv2D with

    kernel' = kernel * s,  bias' = (bias - moving_mean) * s + beta,  s = gamma / sqrt(var + eps).

Keras runs the normalisation as separate elementwise ops over the whole activation map; folded,
the feature pass skips them (bench/RESULTS.md §8 measures the gain). The copy is made once;
`refresh` refolds the current weights before every feature pass. Training and the export keep
the original network (the export's signatures must stay differentiable in its weights).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers


def _foldable_pairs(backbone: keras.Model) -> dict[str, str]:
    """{conv name: BN name} for every BN whose input is a Conv2D output used by that BN only."""
    producer = {id(layer.output): layer for layer in backbone.layers}
    consumers: dict[int, int] = {}
    for layer in backbone.layers:
        if isinstance(layer, layers.InputLayer):  # the only layer without an input
            continue
        for tensor in keras.tree.flatten(layer.input):
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in keras.tree.flatten(backbone.output):
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    pairs = {}
    for layer in backbone.layers:
        if not isinstance(layer, layers.BatchNormalization):
            continue
        conv = producer.get(id(layer.input))
        if (isinstance(conv, layers.Conv2D) and consumers[id(layer.input)] == 1
                and layer.center and layer.scale
                and layer.axis in (-1, len(layer.input.shape) - 1)):
            pairs[conv.name] = layer.name
    return pairs


class _FoldedAway(layers.Layer):
    """Stands where a folded BatchNormalization was (same name, same call arguments)."""

    def call(self, inputs, training=None, mask=None):
        return inputs


class FoldedBackbone:
    """`backbone` for inference, with its Conv2D + BatchNormalization pairs folded.

    Args:
      backbone: a functional dc_tf backbone (models.build_backbone); its weights are read, never
        changed. Build this inside the same tf.distribute scope as the backbone.

    Call `refresh()` after the backbone's weights change, then `network(images, training=False)`
    returns the backbone's endpoints up to float rounding.
    """

    def __init__(self, backbone: keras.Model):
        self.backbone = backbone
        self.pairs = _foldable_pairs(backbone)
        self.folded = set(self.pairs.values())

        def clone(layer):
            if layer.name in self.folded:
                return _FoldedAway(name=layer.name)
            config = layer.get_config()
            if layer.name in self.pairs:
                config.update(use_bias=True, bias_initializer="zeros")
            return layer.__class__.from_config(config)

        self.network = keras.models.clone_model(backbone, clone_function=clone)
        self.refresh()

    def refresh(self) -> None:
        """Copies the backbone's current weights into the copy, folding each BN into its conv."""
        for layer in self.backbone.layers:
            if layer.name in self.pairs:
                bn = self.backbone.get_layer(self.pairs[layer.name])
                gamma, beta, mean, var = (np.asarray(w, np.float64) for w in (
                    bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
                scale = gamma / np.sqrt(var + bn.epsilon)
                kernel = np.asarray(layer.kernel, np.float64) * scale
                bias = np.asarray(layer.bias, np.float64) if layer.use_bias else 0.0
                self.network.get_layer(layer.name).set_weights(
                    [kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)])
            elif layer.weights and layer.name not in self.folded:
                self.network.get_layer(layer.name).set_weights(layer.get_weights())
