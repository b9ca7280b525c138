"""What a dc_tf export says about itself: a small JSON file inside its SavedModel folder.

dc_tf/export.py writes it (and documents its fields); the evaluations read it with
`read_export_info` to know the architecture instead of guessing it from endpoint shapes. An
export without it (another library's, or an older dc_tf's) is still a SavedModel the
evaluations can read.
"""

import json
import os
from typing import Optional

import tensorflow as tf

from dc_core.errors import ConfigError

# Inside the SavedModel folder: `tf.saved_model.load` ignores assets/, copying the folder keeps it.
INFO_FILE = os.path.join("assets", "dc_tf_export.json")
INFO_VERSION = 1
REEXPORT = ("re-run the model's dc_tf.train command with the current dc_tf to write it (a "
            "finished run is exported again, not retrained)")


def read_export_info(path: str) -> Optional[dict]:
    """PATH/INFO_FILE as a dict, or None where the export has none.

    Raises:
      ConfigError: the file is not a JSON object with an integer format_version, or was written
        by a newer dc_tf (format_version > INFO_VERSION).
    """
    file = os.path.join(path, INFO_FILE)
    if not tf.io.gfile.exists(file):
        return None
    try:
        with tf.io.gfile.GFile(file) as f:
            info = json.load(f)
    except (ValueError, tf.errors.OpError) as e:
        raise ConfigError(f"--model={path}: {file} is not readable JSON ({type(e).__name__}: "
                          f"{e}); {REEXPORT}, or delete the file") from e
    version = info.get("format_version") if isinstance(info, dict) else None
    if not isinstance(version, int):
        raise ConfigError(f"--model={path}: {file} has no integer format_version; {REEXPORT}, "
                          "or delete the file")
    if version > INFO_VERSION:
        raise ConfigError(f"--model={path}: {file} has format_version {version}, written by a "
                          f"newer dc_tf than these evaluations (they read up to {INFO_VERSION});"
                          " update the eval package")
    return info
