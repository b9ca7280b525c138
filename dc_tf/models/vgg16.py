"""VGG16 with batch normalisation, as in DeepCluster (docs/protocols.md §1)."""

from __future__ import annotations

import keras
from keras import layers

from dc_tf.models.layers import conv_bn_relu, fc_head, front_end, layer_seed

# Five 2×2/2 max-pools must leave at least one pixel.
MIN_IMAGE_SIZE = 32

_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (filters, convs) per block

# What DeepCluster-v2's --feature_spread spreads: the last convolutional block and fc6, fc7.
SPREAD_ENDPOINTS = (f"conv{len(_BLOCKS)}", "fc6", "fc7")


def build_vgg16(inputs, mean, std, sobel: bool, seed: int | None,
                  dropout: bool = True) -> keras.Model:
    """VGG16-BN on `inputs` ([B, S, S, C] raw pixels in [0, 255]).

    Conv layers are named conv{block}_{i} (conv5_3 is the retrieval layer of docs/protocols.md §6).
    Returns a model named "vgg16" whose output dict holds (shapes at S = 224):
    conv1 [B,224,224,64], conv2 [B,112,112,128], conv3 [B,56,56,256], conv4 [B,28,28,512],
    conv5 [B,14,14,512] (post-ReLU output of each block's last conv, before its pool),
    fc6, fc7 [B,4096] post-ReLU and fc7_pre_relu [B,4096] (the clustering feature).
    """
    x = front_end(inputs, mean, std, sobel)
    endpoints = {}
    index = 0
    for block, (filters, convs) in enumerate(_BLOCKS, start=1):
        for i in range(1, convs + 1):
            x = conv_bn_relu(x, filters, 3, f"conv{block}_{i}", layer_seed(seed, index))
            index += 1
        endpoints[f"conv{block}"] = x
        x = layers.MaxPooling2D(2, strides=2, name=f"pool{block}")(x)
    # DeepCluster's VGG classifier: Linear, ReLU, Dropout, Linear, ReLU (no dropout before fc6).
    fc6, fc7_pre, fc7 = fc_head(x, 4096, seed, dropout_first=(False, True), dropout=dropout)
    endpoints.update(fc6=fc6, fc7=fc7, fc7_pre_relu=fc7_pre)
    return keras.Model(inputs, endpoints, name="vgg16")
