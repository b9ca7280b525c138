"""DeepCluster backbones: a functional Keras model per architecture, returning named endpoints.

Every backbone takes float32 [B, S, S, C] raw pixels in [0, 255], normalises them inside the
model (layer "normalize"), optionally applies the frozen Sobel filter (layer "sobel"), and
returns a dict of endpoint tensors; `cluster_endpoint` names the feature k-means clusters and
`head_endpoint` the one the DeepCluster top layer Dense(k) sits on.
"""

from __future__ import annotations

import contextlib

import keras

from dc_tf.config import ARCHS
from dc_tf.models import alexnet, resnet50, small_vgg, vgg16
from dc_tf.models.folding import FoldedBackbone
from dc_tf.models.layers import NormalizePixels, Sobel

_MODULES = {"alexnet": (alexnet, alexnet.build_alexnet),
            "vgg16": (vgg16, vgg16.build_vgg16),
            "resnet50": (resnet50, resnet50.build_resnet50),
            "small_vgg": (small_vgg, small_vgg.build_small_vgg)}

__all__ = ["ARCHS", "FoldedBackbone", "NormalizePixels", "Sobel", "build_backbone",
           "cluster_endpoint", "head_endpoint", "min_image_size", "spread_endpoints"]


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"--arch={arch!r} is unknown; choose one of {', '.join(ARCHS)}")


def build_backbone(arch: str, image_size: int, channels: int, sobel: bool,
                   mean: tuple[float, ...], std: tuple[float, ...],
                   seed: int | None = None, dropout: bool = True,
                   any_size: bool = False) -> keras.Model:
    """Builds the backbone `arch` as a functional model named `arch`.

    Args:
        arch: one of ARCHS.
        image_size: input height = width in pixels.
        channels: input channels (3 for RGB, 1 for grayscale).
        sobel: put the frozen Sobel front-end (2 output channels) after normalisation.
        mean, std: per-channel statistics on the [0, 1] scale, length `channels` or 1.
        seed: seeds every initializer and dropout layer; same seed -> identical weights.
            None draws fresh random weights.
        dropout: keep the architecture's dropout layers (DeepCluster); False leaves them out
            (DeepCluster-v2, whose memory bank wants the embedding without dropout noise). The
            network at inference is the same either way.
        any_size: take inputs of any height and width (DeepCluster-v2's local crops of another
            size than image_size); only for architectures without fully connected layers.

    Returns:
        keras.Model: float32 [B, image_size, image_size, channels] -> dict of endpoints
        (see each module's build function for names and shapes).
    """
    _check_arch(arch)
    build = _MODULES[arch][1]
    if image_size < min_image_size(arch):
        raise ValueError(f"--image_size={image_size} is too small for --arch={arch}; "
                         f"use at least {min_image_size(arch)}")
    if channels < 1:
        raise ValueError(f"channels={channels} must be at least 1")
    for flag, values in (("--mean", mean), ("--std", std)):
        if len(values) not in (1, channels):
            raise ValueError(f"{flag} has {len(values)} values for {channels}-channel images; "
                             f"give 1 value or {channels}")
    if any_size and arch != "resnet50":
        raise ValueError(f"--arch={arch} ends in fully connected layers that take "
                         f"{image_size}x{image_size} inputs only")
    side = None if any_size else image_size
    inputs = keras.Input((side, side, channels), dtype="float32", name="image")
    return build(inputs, tuple(mean), tuple(std), sobel, seed, dropout)


def min_image_size(arch: str) -> int:
    """Smallest input height and width `arch` accepts (its pools must leave a pixel)."""
    _check_arch(arch)
    return _MODULES[arch][0].MIN_IMAGE_SIZE


def cluster_endpoint(arch: str) -> str:
    """Name of the endpoint that is PCA-reduced and clustered each epoch."""
    _check_arch(arch)
    return "pool" if arch == "resnet50" else "fc7_pre_relu"


def head_endpoint(arch: str) -> str:
    """Name of the endpoint the DeepCluster top layer Dense(k) is applied to."""
    _check_arch(arch)
    return "pool" if arch == "resnet50" else "fc7"


def spread_endpoints(arch: str) -> tuple:
    """The endpoints DeepCluster-v2's --feature_spread spreads: the last convolutional block and
    the fully connected layers between it and the projection head, or ResNet-50's pooled
    features (its last block, averaged)."""
    _check_arch(arch)
    return _MODULES[arch][0].SPREAD_ENDPOINTS


@contextlib.contextmanager
def precision_policy(name: str):
    """Keras's global dtype policy for the layers built inside, restored afterwards.

    mixed_bfloat16 computes in bfloat16 and keeps float32 variables; bfloat16 has float32's
    exponent range, so no loss scaling is needed. The top layer and the clustering features
    stay float32 (DeepClusterModel, the feature pass).
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
