"""Data for DeepCluster: the sources of `dc_core.datasets`, the training pipelines and the
balanced sampler, and the run folder's image lists.

`open_source("fashion_mnist" | "tfds:NAME[:SPLIT]" | "folder:PATH", data_dir, max_examples)`
returns a `Source`; `dc_tf.data.pipelines` turns it into the feature-pass and training datasets.
"""

import re

from absl import logging

from dc_core import fileio
from dc_core.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, all_labels, open_source
from dc_core.errors import DatasetNotFoundError
from dc_core.sources import Source

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "DatasetNotFoundError", "Source",
           "all_labels", "open_source", "write_index_map", "write_skipped"]


def write_index_map(source: Source, path: str) -> None:
    """Writes `index<TAB>source<TAB>label` for every example (label empty where unknown), so
    that the run's assignments, indexed by example, can be traced to files. A file already at `path`
    that holds exactly this is left alone; one that does not (truncated, garbled, edited, or
    written for other images) is named in a warning and replaced."""
    labels = source.labels
    content = "index\tsource\tlabel\n" + "".join(
        f"{i}\t{source.describe(i)}\t{'' if labels is None or labels[i] < 0 else labels[i]}\n"
        for i in range(source.num_examples))
    try:
        with open(path, "rb") as f:
            found = f.read()
    except FileNotFoundError:
        found = None
    if found == content.encode():
        return
    if found is not None:
        logging.warning("%s does not list the %d images of %s as this run reads them (damaged or "
                        "edited): written again", path, source.num_examples, source.name)
    fileio.atomic_write(path, content)


def write_skipped(source: Source, indices, path: str) -> None:
    """Writes `index<TAB>source<TAB>reason` for examples that failed to decode; the reason is
    the decoder's message, found by decoding each one again (random-access sources)."""
    import tensorflow as tf
    with fileio.atomic_open(path, "w", encoding="utf-8") as f:
        f.write("index\tsource\treason\n")
        for i in indices:
            reason = "could not be decoded"
            if source.random_access:
                try:
                    source.decode(tf.constant(int(i), tf.int64), None)
                except (tf.errors.OpError, ValueError) as e:
                    message = str(getattr(e, "message", e))
                    # Keep the decoder's words, not TF's op and device decoration around them.
                    message = re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", message, flags=re.S)
                    reason = " ".join(message.split())[:200]
            f.write(f"{i}\t{source.describe(int(i))}\t{reason}\n")
