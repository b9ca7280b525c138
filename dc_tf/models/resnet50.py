"""ResNet-50 backbone: keras.applications.ResNet50 (no weights, no top) behind the dc_tf front-end.

keras.applications accepts any channel count when weights=None, so the Sobel output (2 channels)
feeds it directly. Its layers are built inline on our front-end tensor (input_tensor=...), so the
model is flat and stage outputs keep their Keras names (conv2_block3_out, ...).
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
from keras import layers

from dc_tf.models.layers import BN_MOMENTUM, conv_init, front_end, layer_seed

# keras.applications refuses inputs smaller than 32 px.
MIN_IMAGE_SIZE = 32

STAGES = {"conv2": "conv2_block3_out", "conv3": "conv3_block4_out",
          "conv4": "conv4_block6_out", "conv5": "conv5_block3_out"}

# What DeepCluster-v2's --feature_spread spreads: the last block, averaged over positions.
SPREAD_ENDPOINTS = ("pool",)


def build_resnet50(inputs, mean, std, sobel: bool, seed: int | None,
                   dropout: bool = True) -> keras.Model:
    """ResNet-50 on `inputs` ([B, S, S, C] raw pixels in [0, 255]).

    Returns a model named "resnet50" whose output dict holds (shapes at S = 224):
    conv2 [B,56,56,256], conv3 [B,28,28,512], conv4 [B,14,14,1024], conv5 [B,7,7,2048]
    (post-ReLU block outputs) and pool [B,2048] (global average of conv5, the clustering feature).
    `dropout` is accepted as by the other architectures; ResNet-50 has no dropout layer.
    """
    x = front_end(inputs, mean, std, sobel)
    with warnings.catch_warnings():
        # Keras warns about channel counts other than 1 or 3; harmless without pretrained weights.
        warnings.filterwarnings("ignore", message=".*input channels.*")
        net = keras.applications.ResNet50(
            weights=None, include_top=False, input_tensor=x, input_shape=tuple(x.shape[1:]))
    # Same initialisation as the other backbones (and torchvision's ResNet): fan-out He convs,
    # zero biases, BN momentum matching PyTorch's 0.1. Seeded so equal seeds give equal weights.
    for i, layer in enumerate(net.layers):
        if isinstance(layer, layers.Conv2D):
            layer.kernel.assign(conv_init(layer_seed(seed, i))(layer.kernel.shape))
            if layer.use_bias:
                layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
        elif isinstance(layer, layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    endpoints = {key: net.get_layer(name).output for key, name in STAGES.items()}
    endpoints["pool"] = layers.GlobalAveragePooling2D(name="avg_pool")(endpoints["conv5"])
    return keras.Model(inputs, endpoints, name="resnet50")
