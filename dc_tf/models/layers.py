"""Frozen input layers and shared building blocks of the DeepCluster backbones.

`NormalizePixels` and `Sobel` are the fixed front-end every backbone starts with
(docs/protocols.md §1); both implement `get_config` so a backbone saves to and loads from the
`.keras` format. The helpers below them build the conv/BN/ReLU units with the paper's
initialisation.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

# Sobel kernels in cross-correlation orientation (what both PyTorch and TF convolutions compute):
# out[y, x] = sum_ij K[i, j] * padded[y + i, x + j]. Copied from docs/protocols.md §1.
SOBEL_X = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float32)
SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float32)

# PyTorch BatchNorm2d(eps=1e-5, momentum=0.1) in Keras terms: Keras keeps `momentum` of the old
# moving statistic, PyTorch gives `momentum` to the new batch statistic.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="dc_tf")
class NormalizePixels(layers.Layer):
    """Maps raw pixels in [0, 255] to (x / 255 - mean) / std per channel.

    Args:
        mean: per-channel means on the [0, 1] scale, length `channels` or 1 (broadcast).
        std: per-channel standard deviations on the [0, 1] scale, same length rule.

    Input: float [batch, height, width, channels]. Output: float32, same shape.
    """

    def __init__(self, mean, std, **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if min(self.std) <= 0:
            raise ValueError(f"--std={self.std} must be positive in every channel")

    def build(self, input_shape):
        channels = input_shape[-1]
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            if len(values) not in (1, channels):
                raise ValueError(
                    f"{flag} has {len(values)} values but the images have {channels} channels; "
                    f"give 1 value or {channels}")
        self.built = True

    def call(self, x):
        # Constants, not weights: nothing here may be trained, decayed or overwritten on load.
        mean = ops.convert_to_tensor(np.asarray(self.mean, np.float32))
        std = ops.convert_to_tensor(np.asarray(self.std, np.float32))
        return (ops.cast(x, "float32") / 255.0 - mean) / std  # float32 even under mixed precision

    def get_config(self):
        return {**super().get_config(), "mean": list(self.mean), "std": list(self.std)}


@keras.saving.register_keras_serializable(package="dc_tf")
class Sobel(layers.Layer):
    """Frozen Sobel front-end: channel average (weight 1/C each), then a fixed 3×3 conv to 2 maps.

    The kernel is a non-trainable weight set in `build` and never touched by any initializer or
    optimizer; a loaded model reads the same values back. Zero padding 1 ('same'), no bias.

    Input: float [batch, H, W, C]. Output: [batch, H, W, 2] in the layer's compute dtype (channel 0 = x, 1 = y).
    """

    def __init__(self, **kwargs):
        kwargs["trainable"] = False
        super().__init__(**kwargs)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(3, 3, 1, 2), initializer="zeros", trainable=False)
        self.kernel.assign(np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :])
        self.built = True

    def call(self, x):
        # Mean over channels = the paper's 1×1 conv with weights 1/C; identity for 1 channel.
        gray = ops.mean(ops.cast(x, self.compute_dtype), axis=-1, keepdims=True)
        kernel = ops.cast(self.kernel, gray.dtype)  # mixed precision: match the input dtype
        return ops.conv(gray, kernel, strides=1, padding="same")

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)

    def get_config(self):
        config = super().get_config()
        config.pop("trainable", None)  # always frozen; __init__ forces it
        return config


# ---------------------------------------------------------------------------------------------
# Shared building blocks (docs/protocols.md §1 initialisation).
# ---------------------------------------------------------------------------------------------


def layer_seed(seed: int | None, index: int) -> int | None:
    """Per-layer seed so two builds with the same `seed` give identical weights; None = random."""
    # Mixed and kept below 2**31 because backends hold seeds as int32.
    return None if seed is None else (int(seed) * 1009 + index) % (2**31 - 1)


def conv_init(seed: int | None) -> keras.initializers.Initializer:
    """N(0, sqrt(2 / (kh * kw * C_out))): He init with fan-out, as the released PyTorch code."""
    return keras.initializers.VarianceScaling(
        2.0, mode="fan_out", distribution="untruncated_normal", seed=seed)


def dense_init(seed: int | None) -> keras.initializers.Initializer:
    """N(0, 0.01) for every Dense layer, the DeepCluster top layer included."""
    return keras.initializers.RandomNormal(0.0, 0.01, seed=seed)


def front_end(inputs, mean, std, sobel: bool):
    """Normalisation, then the Sobel filter if asked. [B, H, W, C] -> [B, H, W, C or 2]."""
    x = NormalizePixels(mean, std, name="normalize")(inputs)
    return Sobel(name="sobel")(x) if sobel else x


def conv_bn_relu(x, filters: int, kernel: int, name: str, seed: int | None,
                 strides: int = 1, padding: str = "same"):
    """Conv2D (with bias, zero-initialised) -> BN -> ReLU; layers named name, name_bn, name_relu."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=True,
                      kernel_initializer=conv_init(seed), bias_initializer="zeros", name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def fc_head(x, units: int, seed: int | None, dropout_first: tuple[bool, bool],
            dropout: bool = True):
    """Flatten -> fc6 -> fc7 with optional Dropout(0.5) before each Dense.

    `dropout_first` says which Dense layers the architecture precedes by dropout; `dropout=False`
    leaves out both (the layers and names are otherwise unchanged).

    Returns (fc6, fc7_pre_relu, fc7) tensors; fc6 and fc7 post-ReLU, [B, units] each.
    Dropout layers are named fc6_dropout / fc7_dropout, Dense layers fc6 / fc7.
    """
    x = layers.Flatten(name="flatten")(x)
    outs = []
    for i, name in enumerate(("fc6", "fc7")):
        if dropout and dropout_first[i]:
            x = layers.Dropout(0.5, seed=layer_seed(seed, 900 + i), name=f"{name}_dropout")(x)
        pre = layers.Dense(units, kernel_initializer=dense_init(layer_seed(seed, 100 + i)),
                           bias_initializer="zeros", name=name)(x)
        x = layers.ReLU(name=f"{name}_relu")(pre)
        outs.append((pre, x))
    return outs[0][1], outs[1][0], outs[1][1]
