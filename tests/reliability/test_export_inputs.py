"""Malformed images given to the SavedModel raise a clear error instead of crashing a kernel."""

import os
import subprocess
import sys

from dc_tf import train

SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
for signature in ("serving_default", "assign"):
    serve = model.signatures[signature]
    for shape, dtype in [((2, 32, 32, 1), np.float32), ((32, 32, 1), np.uint8),
                         ((2, 32, 32, 1, 3), np.uint8), ((2, 28, 28, 1), np.uint8),
                         ((0, 32, 32, 1), np.uint8)]:
        try:
            serve(images=tf.constant(np.zeros(shape, dtype)))
            print(signature, shape, "accepted")
        except tf.errors.InvalidArgumentError as e:
            said = "uint8" in e.message and ("32, 32, 1]" in e.message or "float" in e.message)
            print(signature, shape, "clear error" if said else "unclear: " + e.message[:200])
    out = serve(images=tf.constant(np.zeros((2, 32, 32, 1), np.uint8)))
    print(signature, "good input", "accepted" if out else "no output")
conv = model.signatures["conv_features"]
for shape in [(1, 4, 40, 1), (1, 40, 40, 3), (0, 40, 40, 1)]:
    try:
        conv(images=tf.constant(np.zeros(shape, np.uint8)))
        print("conv_features", shape, "accepted")
    except tf.errors.InvalidArgumentError as e:
        said = "height >= 8" in e.message
        print("conv_features", shape, "clear error" if said else "unclear: " + e.message[:200])
out = conv(images=tf.constant(np.zeros((1, 40, 24, 1), np.uint8)))
print("conv_features good input", "accepted" if out else "no output")
"""


def test_malformed_images_get_a_clear_error(smoke_config):
    cfg = train.run(smoke_config("--epochs=0"))
    result = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(cfg.model_dir, "export")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]  # a kernel check failure aborts
    lines = result.stdout.splitlines()
    assert len(lines) == 16, lines
    assert sum(line.endswith("clear error") for line in lines) == 13, lines
    assert sum(line.endswith("good input accepted") for line in lines) == 3, lines
