r"""What the clusters of a run hold: sizes, purity, majority labels, and folders of links.

    python -m dc_tf.clusters --model_dir=runs/fashion_mnist             # the final clustering
    python -m dc_tf.clusters --model_dir=runs/fashion_mnist --epoch=3
    python -m dc_tf.clusters --model_dir=runs/photos --export_to=/tmp/clusters

Reads the assignments and the image list of a run folder (RunDir); with --export_to (folder
sources only), writes one sub-folder per cluster holding symbolic links to its members' files.
"""

import os
import sys

import numpy as np
from absl import app, flags

from dc_core.clustering import cluster_table
from dc_core.fileio import from_printable
from dc_tf.run_dir import RunDir


def size_histogram(sizes: np.ndarray) -> list:
    """(low, high, count) for power-of-two bins of cluster sizes."""
    edges = 2 ** np.arange(0, int(np.log2(max(sizes.max(), 1))) + 2)
    counts, _ = np.histogram(sizes, bins=edges)
    return [(int(lo), int(hi) - 1, int(n)) for lo, hi, n in zip(edges[:-1], edges[1:], counts)]


def export_links(model_dir: str, assignment: np.ndarray, sources: list, out_dir: str) -> int:
    """Writes out_dir/cluster_NNNNN/ with a symbolic link per member file; returns the count."""
    dataset = RunDir(model_dir).config_fields()["dataset"]
    if not dataset.startswith("folder:"):
        raise ValueError(f"--export_to needs a folder:PATH dataset; this run used {dataset}")
    root = os.path.abspath(dataset[len("folder:"):])
    width = len(str(max(int(assignment.max()), 0)))
    made = 0
    for i, c in enumerate(assignment):
        if c < 0:
            continue
        folder = os.path.join(out_dir, f"cluster_{int(c):0{width}d}")
        os.makedirs(folder, exist_ok=True)
        path = from_printable(sources[i])  # the image list escapes names that are not UTF-8
        link = os.path.join(folder, f"{i}_{os.path.basename(path)}")
        if not os.path.lexists(link):
            os.symlink(os.path.join(root, path), link)
        made += 1
    return made


FLAGS = flags.FLAGS


def _define_flags():
    """Flags exist only when this module is the program, not when it is imported."""
    flags.DEFINE_string("model_dir", None, "A training run's folder.")
    flags.DEFINE_string("epoch", "final", "'final' or an epoch number.")
    flags.DEFINE_integer("max_rows", 20, "Print the N largest clusters.")
    flags.DEFINE_string("export_to", "", "Write per-cluster folders of links here (folder sources).")


def main(argv):
    del argv
    try:
        run = RunDir(FLAGS.model_dir)
        assignment = run.load_assignment(FLAGS.epoch)
        sources, labels = run.load_examples(len(assignment))
        if FLAGS.export_to:
            made = export_links(FLAGS.model_dir, assignment, sources, FLAGS.export_to)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    table = cluster_table(assignment, labels)
    sizes = np.array([r["size"] for r in table])
    print(f"{len(table)} non-empty clusters of {len(assignment)} examples "
          f"({int((assignment < 0).sum())} unreadable); sizes min {sizes.min()}, "
          f"median {int(np.median(sizes))}, max {sizes.max()}")
    if "purity" in table[0]:
        print(f"mean purity {np.mean([r['purity'] for r in table]):.3f}")
    print("size histogram:")
    bins = size_histogram(sizes)
    first = next(i for i, b in enumerate(bins) if b[2])
    for lo, hi, n in bins[first:]:
        print(f"  {lo:>7}-{hi:<7} {n:>6} {'#' * min(n, 60)}")
    print(f"largest {min(FLAGS.max_rows, len(table))} clusters:")
    for r in table[:FLAGS.max_rows]:
        extra = (f"  majority label {r['majority_label']}  purity {r['purity']:.3f}"
                 if "purity" in r else "")
        print(f"  cluster {r['cluster']:>6}  size {r['size']:>7}{extra}")
    if FLAGS.export_to:
        print(f"linked {made} files into {FLAGS.export_to}")


if __name__ == "__main__":
    _define_flags()
    flags.mark_flag_as_required("model_dir")
    app.run(main)
