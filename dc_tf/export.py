"""SavedModel export: uint8 images in, a dict of named features out, preprocessing inside.

The export is a plain `tf.Module` whose `serving_default` signature casts uint8 images to float,
runs the backbone in inference mode (normalisation and Sobel are layers of the backbone) and
returns every named endpoint. When the run has a final clustering, a second signature `assign`
puts images into its clusters: the clustering feature, PCA-whitened and L2-normalised as k-means
saw it (`embedding`), its nearest centroid (`cluster`, int32) and the L2 distance to it
(`distance`). The whitening and the centroids are variables of the SavedModel.

A third signature, `conv_features`, takes uint8 images of any height and width (at least the
architecture's minimum, e.g. 1024-px photographs for retrieval or detection) and returns the
convolutional endpoints only (the fully connected ones need the training size). Evaluators that
fine-tune read the backbone's weights from the attribute `backbone_trainable_variables`: the
signatures are differentiable with respect to them (batch normalisation in inference mode).

It loads with `tf.saved_model.load` in a process that has never imported dc_tf, and it contains
no numpy_function.

The export says what it is in `assets/dc_tf_export.json` (INFO_FILE; `tf.saved_model.load`
ignores it, copying the folder keeps it), plain JSON that dc_core.export_info reads for the
evaluations:

    format "dc_tf_export", format_version (INFO_VERSION; a reader refuses a newer one),
    method ("deepcluster", "deepcluster_v2", "supervised"; null when the caller did not say),
    arch (null for a network that is not a dc_tf architecture), image_size, channels, min_size
    (the smallest height and width conv_features accepts), input_dtype "uint8", input_range
    [0, 255], normalization ({"mean", "std"} on the [0, 1] scale, applied inside as
    (x / 255 - mean) / std; null if the network does not normalise), sobel,
    endpoints ({name: shape without the batch axis} of serving_default, sorted by name),
    conv_endpoints (the names conv_features returns, at any size), signatures (sorted names),
    embedding and assign (whether there is an `embedding` endpoint and an `assign` signature),
    cluster_endpoint and num_clusters (of `assign`; null without it).

    m = tf.saved_model.load("MODEL_DIR/export")
    feats = m.signatures["serving_default"](images=tf.constant(uint8_images))
    feats["fc7"], feats["conv5"], ...
    m.signatures["assign"](images=tf.constant(uint8_images))["cluster"]
    m.signatures["conv_features"](images=tf.constant(big_uint8_images))["conv5"]
    with tf.GradientTape() as tape:
        loss = ...(m.signatures["serving_default"](images=x)["fc7"])
    grads = tape.gradient(loss, list(m.backbone_trainable_variables))
"""

import json
import os
import shutil
from typing import Optional

import keras
import tensorflow as tf

from dc_core.export_info import INFO_FILE, INFO_VERSION
from dc_core.fileio import atomic_write
from dc_tf import failpoints
from dc_tf.config import ARCHS
from dc_tf.models.layers import NormalizePixels, Sobel
from dc_tf.recluster import FinalClustering


class _FeatureModule(tf.Module):
    def __init__(self, backbone: keras.Model, image_size: int, channels: int, min_size: int,
                 cluster_endpoint: Optional[str], final: Optional[FinalClustering]):
        super().__init__(name="dc_tf_export")
        self.backbone = backbone
        self.backbone_trainable_variables = list(backbone.trainable_variables)
        self.size, self.channels, self.min_size = image_size, channels, min_size
        spec = tf.TensorSpec([None, image_size, image_size, channels], tf.uint8, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])
        conv = {name: out for name, out in backbone.output.items() if len(out.shape) == 4}
        self.conv_backbone = keras.Model(backbone.input, conv, name=f"{backbone.name}_conv")
        any_size = tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")
        self.conv_features = tf.function(self._conv_features, input_signature=[any_size])
        if final is not None:
            self.cluster_endpoint = cluster_endpoint
            self.pca_mean = tf.Variable(final.mean, trainable=False, name="pca_mean")
            self.pca_matrix = tf.Variable(final.matrix, trainable=False, name="pca_matrix")
            self.centroids = tf.Variable(final.centroids, trainable=False, name="centroids")
            self.assign = tf.function(self._assign, input_signature=[spec])

    def _checked(self, images, any_size: bool = False):
        """float32 images, after checks that turn a malformed input into a clear error rather
        than a crash inside a convolution kernel (a signature checks only the dtype)."""
        # The signature's static shape says rank 4 whatever is fed, so tf.rank would be folded
        # to 4: read the runtime shape, zero-padded to 4 entries, and count the elements.
        shape = tf.pad(tf.shape(images), [[0, 4]])[:4]
        ok = (shape[0] > 0) & tf.equal(tf.size(images), tf.reduce_prod(shape))
        if any_size:
            expected = (f"expected uint8 images [batch > 0, height >= {self.min_size}, "
                        f"width >= {self.min_size}, {self.channels}]")
            ok &= tf.reduce_all(shape[1:3] >= self.min_size) & tf.equal(shape[3], self.channels)
        else:
            expected = (f"expected uint8 images [batch > 0, {self.size}, {self.size}, "
                        f"{self.channels}]")
            ok &= tf.reduce_all(tf.equal(shape[1:], [self.size, self.size, self.channels]))
        check = tf.debugging.Assert(ok, [expected, "got shape", tf.shape(images)])
        with tf.control_dependencies([check]):
            return tf.cast(images, tf.float32)

    def _serve(self, images):
        outputs = self.backbone(self._checked(images), training=False)
        return _float32(outputs)

    def _conv_features(self, images):
        outputs = self.conv_backbone(self._checked(images, any_size=True), training=False)
        return _float32(outputs)

    def _assign(self, images):
        # Through `serve`, traced already for the same input signature: the backbone is traced
        # once for both signatures, and `assign` reads exactly what `serve` returns.
        x = self.serve(images)[self.cluster_endpoint]
        z = tf.matmul(x - self.pca_mean, self.pca_matrix)
        # As clustering.l2_normalize: x / (||x|| + 1e-10).
        z = z / (tf.norm(z, axis=1, keepdims=True) + 1e-10)
        d2 = (tf.reduce_sum(z * z, 1, keepdims=True) - 2.0 * tf.matmul(z, self.centroids,
                                                                        transpose_b=True)
              + tf.reduce_sum(self.centroids * self.centroids, 1)[None, :])
        cluster = tf.argmin(d2, axis=1, output_type=tf.int32)
        distance = tf.sqrt(tf.maximum(tf.reduce_min(d2, axis=1), 0.0))
        return {"cluster": cluster, "distance": distance, "embedding": z}


def _float32(outputs: dict) -> dict:
    """The endpoints as float32 (a mixed-precision backbone computes them in bfloat16)."""
    return {name: tf.cast(value, tf.float32, name=name) for name, value in outputs.items()}


def _arch_of(backbone: keras.Model) -> Optional[str]:
    """The dc_tf architecture a backbone was built as: models.build_backbone names the model
    after it, DeepCluster-v2's export network adds "_v2"."""
    for name in (backbone.name, backbone.name.removesuffix("_v2")):
        if name in ARCHS:
            return name
    return None


def export_info(module: _FeatureModule, backbone: keras.Model, signatures: dict,
                method: Optional[str], arch: Optional[str]) -> dict:
    """The content of INFO_FILE (see the module docstring) for an export about to be saved."""
    def shapes(function) -> dict:
        outputs = function.get_concrete_function().structured_outputs
        return {name: [None if d is None else int(d) for d in out.shape[1:]]
                for name, out in sorted(outputs.items())}

    normalize = [layer for layer in backbone.layers if isinstance(layer, NormalizePixels)]
    endpoints = shapes(module.serve)
    final = "assign" in signatures
    return {
        "format": "dc_tf_export", "format_version": INFO_VERSION, "method": method,
        "arch": arch or _arch_of(backbone), "image_size": module.size,
        "channels": module.channels, "min_size": module.min_size, "input_dtype": "uint8",
        "input_range": [0, 255],
        "normalization": ({"mean": list(normalize[0].mean), "std": list(normalize[0].std)}
                          if normalize else None),
        "sobel": any(isinstance(layer, Sobel) for layer in backbone.layers),
        "endpoints": endpoints, "conv_endpoints": sorted(shapes(module.conv_features)),
        "signatures": sorted(signatures), "embedding": "embedding" in endpoints,
        "assign": final, "cluster_endpoint": module.cluster_endpoint if final else None,
        "num_clusters": int(module.centroids.shape[0]) if final else None}


def export_saved_model(backbone: keras.Model, path: str, image_size: int, channels: int,
                       min_size: int, cluster_endpoint: Optional[str] = None,
                       final: Optional[FinalClustering] = None, *,
                       method: Optional[str] = None, arch: Optional[str] = None) -> str:
    """Writes the SavedModel to `path`, replacing any earlier export only once complete.

    Args:
      backbone: the network, mapping float32 [B, S, S, C] pixels in [0, 255] to named endpoints.
      path: output folder (MODEL_DIR/export).
      image_size, channels: S and C of the uint8 images the signatures accept.
      min_size: the smallest height and width `conv_features` accepts (the architecture's).
      cluster_endpoint: the endpoint that was clustered (with `final`).
      final: the final clustering; adds the `assign` signature.
      method: what trained the network ("deepcluster", "deepcluster_v2", "supervised"), for
        INFO_FILE (None: recorded as null).
      arch: the architecture, for INFO_FILE (None: read from the backbone's name).
    """
    module = _FeatureModule(backbone, image_size, channels, min_size, cluster_endpoint, final)
    signatures = {"serving_default": module.serve, "conv_features": module.conv_features}
    if final is not None:
        signatures["assign"] = module.assign
    info = export_info(module, backbone, signatures, method, arch)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures=signatures)
    atomic_write(os.path.join(tmp, INFO_FILE), json.dumps(info, indent=1) + "\n")
    failpoints.reach("export.written")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    failpoints.reach("export.done")
    return path
