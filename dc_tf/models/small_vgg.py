"""A small VGG-style network for 28–64 px images (CIFAR, MNIST, STL at low resolution).

Not in the paper: it lets DeepCluster run end to end on small data sets and in tests. It keeps the
paper's structure (conv/BN/ReLU blocks, two dropout + fc layers, clustering on fc7 before ReLU).
"""

from __future__ import annotations

import keras
from keras import layers

from dc_tf.models.layers import conv_bn_relu, fc_head, front_end, layer_seed

# Three 2×2/2 max-pools must leave at least one pixel.
MIN_IMAGE_SIZE = 8

_FILTERS = (32, 64, 128)

# What DeepCluster-v2's --feature_spread spreads: the last convolutional block and fc6, fc7.
SPREAD_ENDPOINTS = (f"conv{len(_FILTERS)}", "fc6", "fc7")


def build_small_vgg(inputs, mean, std, sobel: bool, seed: int | None,
                  dropout: bool = True) -> keras.Model:
    """Small VGG on `inputs` ([B, S, S, C] raw pixels in [0, 255]).

    Returns a model named "small_vgg" whose output dict holds (shapes at S = 32):
    conv1 [B,32,32,32], conv2 [B,16,16,64], conv3 [B,8,8,128] (post-ReLU output of each block's
    second conv, before its pool), fc6, fc7 [B,512] post-ReLU and fc7_pre_relu [B,512].
    """
    x = front_end(inputs, mean, std, sobel)
    endpoints = {}
    for block, filters in enumerate(_FILTERS, start=1):
        for i in (1, 2):
            x = conv_bn_relu(x, filters, 3, f"conv{block}_{i}", layer_seed(seed, 2 * block + i))
        endpoints[f"conv{block}"] = x
        x = layers.MaxPooling2D(2, strides=2, name=f"pool{block}")(x)
    fc6, fc7_pre, fc7 = fc_head(x, 512, seed, dropout_first=(True, True), dropout=dropout)
    endpoints.update(fc6=fc6, fc7=fc7, fc7_pre_relu=fc7_pre)
    return keras.Model(inputs, endpoints, name="small_vgg")
