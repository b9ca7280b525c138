"""SavedModel export: uint8 images in, a dict of named features out, preprocessing inside.

The export is a plain `tf.Module` whose `serving_default` signature casts uint8 images to float,
runs the backbone in inference mode (normalisation and Sobel are layers of the backbone) and
returns every named endpoint. It loads with `tf.saved_model.load` in a process that has never
imported dc_tf, and it contains no numpy_function.

    m = tf.saved_model.load("MODEL_DIR/export")
    feats = m.signatures["serving_default"](images=tf.constant(uint8_images))
    feats["fc7"], feats["conv5"], ...
"""

import os
import shutil

import keras
import tensorflow as tf


class _FeatureModule(tf.Module):
    def __init__(self, backbone: keras.Model, image_size: int, channels: int):
        super().__init__(name="dc_tf_export")
        self.backbone = backbone
        spec = tf.TensorSpec([None, image_size, image_size, channels], tf.uint8, name="images")
        self.serve = tf.function(self._serve, input_signature=[spec])

    def _serve(self, images):
        outputs = self.backbone(tf.cast(images, tf.float32), training=False)
        return {name: tf.identity(value, name=name) for name, value in outputs.items()}


def export_saved_model(backbone: keras.Model, path: str, image_size: int, channels: int) -> str:
    """Writes the SavedModel to `path`, replacing any earlier export only once complete.

    Args:
      backbone: the network, mapping float32 [B, S, S, C] pixels in [0, 255] to named endpoints.
      path: output folder (MODEL_DIR/export).
      image_size, channels: S and C of the uint8 images the signature accepts.
    """
    module = _FeatureModule(backbone, image_size, channels)
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path
