"""The detector of eval.voc_detection: KerasHub's RetinaNet on a dc_tf export's conv features.

    backbone = ExportedBackbone(path)
    plan = pyramid_plan(backbone.shapes, backbone.architecture("the pyramid"))  # P3-P5 sources
    detector, backbone_variables = build_detector(
        tf.saved_model.load(path), plan, channels=3, num_classes=20, frozen=False,
        head_convs=4, head_norm=True, score_threshold=0.05, nms_iou=0.5, max_detections=100)

KerasHub (keras-hub 0.32) provides the detector: `RetinaNetBackbone` (an FPN on the image
encoder's P3-P5 that adds P6 and P7 by stride-2 convolutions on C5), `RetinaNetObjectDetector`
(class and box heads shared over the levels, `AnchorGenerator` with 3 scales x 3 ratios of 4·2^l
px at level l, `RetinaNetLabelEncoder`: IoU >= 0.5 positive, < 0.4 background, focal loss and
Huber box loss normalised by the positive anchors). This module supplies the image encoder:
`ExportedPyramid` calls the export's `conv_features` signature and turns its endpoints into the
P3-P5 maps (strides 8, 16, 32) the FPN expects:

| arch | P3 | P4 | P5 |
|---|---|---|---|
| AlexNet | conv2 | conv5 | conv5, max-pool 3/2 (its pool5) |
| VGG16 | conv4 (conv4_3) | conv5 (conv5_3) | conv5, max-pool 2/2 (its pool5) |
| ResNet-50 | conv3 | conv4 | conv5 |
| small_vgg | conv3, max-pool 2/2 (its pool3) | and 2/2 again | and 2/2 again |

Each map is resized bilinearly to exactly (H / 2^l, W / 2^l) of the input: AlexNet's unpadded
11x11/4 conv and 3/2 pools give 99 x 99 instead of 100 x 100 at 800 px, and the FPN's top-down
path adds maps upsampled by exactly 2 (VGG16, ResNet-50 and small_vgg need no resizing on
inputs that are multiples of 32). small_vgg (a test network with strides 1, 2, 4) gets its
coarser levels from parameter-free max-pools.

`ClassAwareNMS` replaces KerasHub's default decoder, which keeps one class per anchor and
suppresses across classes: RetinaNet's inference (and VOC's per-class AP) scores every class of
every anchor and suppresses within each class (tf.image.combined_non_max_suppression). The
heads are re-initialised as the RetinaNet paper says (see `build_detector`).
"""

import dataclasses
import math
from typing import Optional

import keras
import tensorflow as tf
from keras_hub.models import (FeaturePyramidBackbone, RetinaNetBackbone,
                              RetinaNetObjectDetector)

from eval.features import guess_arch, unknown_arch

LEVELS = (3, 4, 5)  # fed by the backbone; the FPN adds 6 and 7
MAX_LEVEL = 7
PRE_NMS_TOP_K = 5000  # anchors kept (by best class score) before NMS: detectron2's 1000 a level
PRIOR_PROBABILITY = 0.01


@dataclasses.dataclass(frozen=True)
class PyramidPlan:
    """Where P3, P4 and P5 come from: per level (endpoint, ((pool kernel, stride), ...))."""
    arch: str
    sources: tuple


# Per architecture: the sources of P3, P4 and P5.
_PLANS = {
    "alexnet": (("conv2", ()), ("conv5", ()), ("conv5", ((3, 2),))),
    "vgg16": (("conv4", ()), ("conv5", ()), ("conv5", ((2, 2),))),
    "resnet50": (("conv3", ()), ("conv4", ()), ("conv5", ())),
    "small_vgg": (("conv3", ((2, 2),)), ("conv3", ((2, 2),) * 2), ("conv3", ((2, 2),) * 3)),
}


def pyramid_plan(shapes: dict, arch: Optional[str] = None) -> PyramidPlan:
    """The pyramid of an export with endpoint shapes `shapes` ({name: shape without batch}) and
    architecture `arch` (ExportedBackbone.architecture; None: the one the shapes look like)."""
    arch = arch or guess_arch(shapes)
    what = "which endpoints feed the detector from"
    if arch not in _PLANS:
        raise unknown_arch(what, shapes, arch)
    needs = tuple(name for name, _ in _PLANS[arch])
    if not set(needs) <= set(shapes):
        raise unknown_arch(what, shapes, arch, needs)
    return PyramidPlan(arch, _PLANS[arch])


class ExportedPyramid(keras.layers.Layer):
    """float [B, H, W, C] pixels (H, W multiples of 32) -> {"P3", "P4", "P5": [B, H/2^l, W/2^l,
    channels]} from the export's `conv_features` signature (BN in inference mode).

    The export's variables are not Keras weights: the caller trains them (`all` mode) through
    `build_detector`'s list. `frozen` stops gradients at the pyramid.
    """

    def __init__(self, module, plan: PyramidPlan, frozen: bool, **kwargs):
        super().__init__(**kwargs)
        self._module, self._plan, self._frozen = module, plan, frozen
        self._conv = module.signatures["conv_features"]
        self.built = True

    def call(self, images):
        pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
        endpoints = self._conv(images=pixels)
        size = tf.shape(images)[1:3]
        pyramid = {}
        for level, (name, pools) in zip(LEVELS, self._plan.sources):
            x = endpoints[name]
            for kernel, stride in pools:
                x = tf.nn.max_pool2d(x, kernel, stride, "VALID")
            x = tf.image.resize(x, size // 2 ** level)
            pyramid[f"P{level}"] = tf.stop_gradient(x) if self._frozen else x
        return pyramid


class ExportedEncoder(FeaturePyramidBackbone):
    """KerasHub's image-encoder contract (inputs, pyramid_outputs) over an `ExportedPyramid`."""

    def __init__(self, module, plan: PyramidPlan, channels: int, frozen: bool, **kwargs):
        inputs = keras.Input((None, None, channels), name="images")
        pyramid = ExportedPyramid(module, plan, frozen, name="exported_conv_features")(inputs)
        super().__init__(inputs=inputs, outputs=pyramid, **kwargs)
        self.pyramid_outputs = pyramid


class ClassAwareNMS(keras.layers.Layer):
    """RetinaNet's inference on decoded boxes: the PRE_NMS_TOP_K anchors of highest class score,
    then per-class NMS. Returns KerasHub's decoder dict: boxes float [B, max_detections, 4] (in
    `bounding_box_format`), confidence [B, max_detections] (sigmoid), labels int32, and
    num_detections int32 [B] (the valid rows of each image come first)."""

    def __init__(self, bounding_box_format: str, iou_threshold: float,
                 confidence_threshold: float, max_detections: int, **kwargs):
        super().__init__(**kwargs)
        self.bounding_box_format = bounding_box_format
        self.iou_threshold, self.confidence_threshold = iou_threshold, confidence_threshold
        self.max_detections = max_detections
        self.built = True

    def call(self, box_prediction, class_prediction, images=None):
        scores = tf.sigmoid(class_prediction)
        k = tf.minimum(PRE_NMS_TOP_K, tf.shape(scores)[1])
        _, top = tf.math.top_k(tf.reduce_max(scores, axis=-1), k)
        # IoU does not depend on the coordinate order, so xyxy boxes can go in as yxyx.
        boxes, confidence, labels, valid = tf.image.combined_non_max_suppression(
            tf.gather(box_prediction, top, batch_dims=1)[:, :, None],
            tf.gather(scores, top, batch_dims=1), self.max_detections, self.max_detections,
            self.iou_threshold, self.confidence_threshold, clip_boxes=False)
        return {"boxes": boxes, "confidence": confidence, "labels": tf.cast(labels, tf.int32),
                "num_detections": valid}


def build_detector(module, plan: PyramidPlan, channels: int, num_classes: int, frozen: bool,
                   head_convs: int, head_norm: bool, score_threshold: float, nms_iou: float,
                   max_detections: int) -> tuple:
    """RetinaNet on the export; returns (compiled detector, backbone variables it trains).

    Args:
        module: the loaded export (tf.saved_model.load).
        plan: its `pyramid_plan`.
        channels: C of its images.
        num_classes: object classes.
        frozen: the backbone stays fixed (the list returned is then empty).
        head_convs: 3x3 conv layers of the class and box heads before their outputs (RetinaNet:
            4).
        head_norm: GroupNorm(32) after each of those convs (torchvision's RetinaNet v2; the
            heads then do not depend on the scale of the backbone's features, which is O(1)
            in trained exports but reaches ~50 in a random-init ResNet-50's conv5).
        score_threshold, nms_iou, max_detections: the decoder's settings.

    Returns:
        (RetinaNetObjectDetector taking float [B, H, W, C] pixels in [0, 255] with H, W
        multiples of 32 and boxes "xyxy" in pixels, list of the export's tf.Variables that the
        pyramid depends on: kernels, biases, BN gamma and beta, not the fc layers).
    """
    encoder = ExportedEncoder(module, plan, channels, frozen, name="exported_encoder")
    backbone = RetinaNetBackbone(image_encoder=encoder, min_level=LEVELS[0], max_level=MAX_LEVEL,
                                 use_p5=False, image_shape=(None, None, channels))
    detector = RetinaNetObjectDetector(
        backbone, num_classes, bounding_box_format="xyxy", pre_logits_num_conv_layers=head_convs,
        use_prediction_head_norm=head_norm,
        prediction_decoder=ClassAwareNMS("xyxy", nms_iou, score_threshold, max_detections))
    # RetinaNet's head initialisation (Lin et al. 2017, §4.1), which keras-hub 0.32 departs
    # from: kernels N(0, 0.01) (Keras' "random_normal" is N(0, 0.05): through 4 convs of 2304
    # inputs the logits reach tens and the focal loss ~10^3), biases 0, and the class logits'
    # bias -log((1 - π) / π), π = 0.01, so that the ~10^5 background anchors do not swamp the
    # first iterations (keras-hub gives that bias to the box head).
    init = keras.initializers.RandomNormal(stddev=0.01)
    for head in (detector.classification_head, detector.box_head):
        for conv in head.conv_layers + [head.prediction_layer]:
            conv.kernel.assign(init(conv.kernel.shape))
            if conv.bias is not None:  # GroupNorm's convs have none
                conv.bias.assign(tf.zeros(conv.bias.shape))
    prior = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
    detector.classification_head.prediction_layer.bias.assign(
        tf.fill(detector.classification_head.prediction_layer.bias.shape, prior))
    # The optimiser is the caller's SGD; compile() sets the losses (focal, Huber).
    detector.compile(optimizer="sgd")
    if frozen:
        return detector, []
    variables = list(module.backbone_trainable_variables)
    probe = ExportedPyramid(module, plan, frozen=False)
    with tf.GradientTape() as tape:
        pyramid = probe(tf.zeros([1, 128, 128, channels]))
        total = tf.add_n([tf.reduce_sum(x) for x in pyramid.values()])
    grads = tape.gradient(total, variables)
    return detector, [v for v, g in zip(variables, grads) if g is not None]
