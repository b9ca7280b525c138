"""AlexNet with batch normalisation, as in DeepCluster (docs/protocols.md §1)."""

from __future__ import annotations

import keras
from keras import layers

from dc_tf.models.layers import conv_bn_relu, fc_head, front_end, layer_seed

# Smallest input whose conv5 map still fits the last 3×3/2 max-pool:
# conv1 (s + 4 - 11) // 4 + 1 >= 15 -> pool 7 -> pool 3 -> pool 1.
MIN_IMAGE_SIZE = 63

# (name, filters, kernel, max-pool 3/2 after it)
_CONVS = (("conv1", 96, 11, True), ("conv2", 256, 5, True), ("conv3", 384, 3, False),
          ("conv4", 384, 3, False), ("conv5", 256, 3, True))

# What DeepCluster-v2's --feature_spread spreads: the last convolutional block and fc6, fc7.
SPREAD_ENDPOINTS = (_CONVS[-1][0], "fc6", "fc7")


def build_alexnet(inputs, mean, std, sobel: bool, seed: int | None,
                  dropout: bool = True) -> keras.Model:
    """AlexNet-BN on `inputs` ([B, S, S, C] raw pixels in [0, 255]).

    Returns a model named "alexnet" whose output dict holds (shapes at S = 224):
    conv1 [B,55,55,96], conv2 [B,27,27,256], conv3 [B,13,13,384], conv4 [B,13,13,384],
    conv5 [B,13,13,256] (post-ReLU, before the max-pool), fc6 [B,4096], fc7 [B,4096] (post-ReLU)
    and fc7_pre_relu [B,4096] (the clustering feature).
    """
    x = front_end(inputs, mean, std, sobel)
    endpoints = {}
    for i, (name, filters, kernel, pool) in enumerate(_CONVS):
        if name == "conv1":
            # Explicit pad 2 + valid conv reproduces PyTorch's 55×55; 'same' would give 56×56.
            x = layers.ZeroPadding2D(2, name="conv1_pad")(x)
            x = conv_bn_relu(x, filters, kernel, name, layer_seed(seed, i), strides=4,
                             padding="valid")
        else:
            x = conv_bn_relu(x, filters, kernel, name, layer_seed(seed, i))
        endpoints[name] = x
        if pool:
            x = layers.MaxPooling2D(3, strides=2, padding="valid", name=f"pool{name[-1]}")(x)
    # PyTorch order: Dropout, Linear, ReLU, Dropout, Linear, ReLU.
    fc6, fc7_pre, fc7 = fc_head(x, 4096, seed, dropout_first=(True, True), dropout=dropout)
    endpoints.update(fc6=fc6, fc7=fc7, fc7_pre_relu=fc7_pre)
    return keras.Model(inputs, endpoints, name="alexnet")
