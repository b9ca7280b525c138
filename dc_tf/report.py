r"""A training run's report page.

    python -m dc_tf.report runs/fashion_mnist          # rebuilds runs/fashion_mnist/report.html

dc_tf.train rewrites MODEL_DIR/report.html after every epoch and at the end; this command
rebuilds it for any run, finished or not. The page is one static file that opens from disk
(plots and montages are embedded as data: URIs, no script, no network): what the run is and its
final figures; a gallery of clusters (montages with each cluster's size and, with labels, its
majority class and purity), the largest clusters and the cluster sizes; the training curves
(loss, pseudo-label accuracy, k-means loss, NMI with the previous clustering and with the labels
when known, time per phase) and the epochs' figures; the skipped images with their reasons; and
the configuration. The page's blocks are rendered by dc_core.pages.
"""

import csv
import dataclasses
import datetime
import json
import os
import sys

from dc_tf import console

console.quiet_tensorflow_startup()  # as a program: before TensorFlow loads (through Keras)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, logging  # noqa: E402

from dc_core import fileio  # noqa: E402
from dc_core.clustering import cluster_table  # noqa: E402
from dc_core.pages import Image, html_page, panels, plot, png_bytes  # noqa: E402
from dc_tf.console import figure  # noqa: E402
from dc_tf.run_dir import RunDir  # noqa: E402

GALLERY_CLUSTERS = 12  # clusters drawn for the gallery
SKIPPED_SHOWN = 50  # skipped images listed
LARGEST_SHOWN = 10  # clusters listed with their majority class
# Metrics fields drawn as curves: (plot title, y label, fields)
_CURVES = (("Training loss", "loss", ("loss",)),
           ("Pseudo-label accuracy (training crops)", "accuracy", ("accuracy",)),
           ("k-means loss", "loss", ("kmeans_loss",)),
           ("NMI of the clustering", "NMI", ("nmi_prev", "nmi_labels")),
           ("Time per phase", "seconds", ("time_features_s", "time_cluster_s", "time_train_s")))


# ------------------------------------------------------------------------------ a run's page

def _curves(rows: list) -> list:
    specs = []
    for title, ylabel, fields in _CURVES:
        series = [(field, [r["epoch"] for r in rows if r.get(field) is not None],
                   [r[field] for r in rows if r.get(field) is not None]) for field in fields]
        series = [s for s in series if s[1]]
        if series:
            specs.append((title, "epoch", ylabel, series, False))
    return [("img", panels("training_curves.png", "training curves", specs))] if specs else []


def _cluster_table(assignment: np.ndarray, labels: np.ndarray, class_names) -> list:
    rows = cluster_table(assignment, labels)[:LARGEST_SHOWN]
    if "purity" not in rows[0]:
        return [("table", ["cluster", "images"], [[str(r["cluster"]), str(r["size"])]
                                                   for r in rows])]
    def name(label):
        return class_names[label] if class_names and 0 <= label < len(class_names) else str(label)
    return [("table", ["cluster", "images", "majority class", "purity"],
             [[str(r["cluster"]), str(r["size"]), name(r["majority_label"]),
               f"{r['purity']:.2f}"] for r in rows])]


def _gallery(source, assignment: np.ndarray, what: str, seed) -> list:
    """Montages of GALLERY_CLUSTERS clusters drawn with `seed`, or a note saying why the images
    do not read back (a folder moved since the run, say)."""
    from dc_tf.visualization.cluster_montage import cluster_montage  # loads TensorFlow
    try:
        image = cluster_montage(source, assignment, seed, num_clusters=GALLERY_CLUSTERS)
    except (OSError, ValueError) as e:
        return [("p", f"No gallery: the training images do not read back ({e}).")]
    return [("p", f"{GALLERY_CLUSTERS} clusters of the {what}, drawn at random; each row is up "
                  "to 8 of its images under its size (and, with labels, its majority class and "
                  "purity)."),
            ("img", Image("gallery.png", f"clusters of the {what}", png_bytes(image)))]


def _skipped(run: RunDir) -> list:
    path = run.skipped
    if not os.path.exists(path):
        return [("p", "Every image was read.")]
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [r for r in csv.reader(f, delimiter="\t")][1:]  # header: index, source, reason
    blocks = [("p", f"{len(rows)} images could not be read and were left out of training "
                    f"(all in {path}).")]
    if rows:
        blocks.append(("table", ["index", "image", "reason"],
                       [[*(r + ["", "", ""])[:3]] for r in rows[:SKIPPED_SHOWN]]))
    return blocks


def _training(rows: list) -> list:
    if not rows:
        return [("h2", "Training"), ("p", "No epoch has finished yet.")]
    keys = [key for key in ("loss", "accuracy", "kmeans_loss", "nmi_prev", "nmi_labels",
                            "empty_clusters", "time_train_s") if key in rows[0]]
    return [("h2", "Training"), *_curves(rows),
            ("table", ["epoch", *keys], [[str(r["epoch"]), *(figure(r.get(key)) for key in keys)]
                                         for r in rows])]


def _labels(run: RunDir, source, n: int) -> np.ndarray:
    """The ground-truth labels of the clustered images: the open source's when it has them (no
    read of the run's image list at every epoch), else the image list's."""
    if source is not None and source.labels is not None and len(source.labels) == n:
        return source.labels
    return run.load_examples(n)[1]


def _clusters(run: RunDir, source, why_no_source: str, seed) -> list:
    last = run.last_assignment()
    if last is None:
        return []
    what, assignment = last
    counts = np.bincount(assignment[assignment >= 0])
    counts = np.sort(counts[counts > 0])[::-1]
    return [("h2", "Clusters"),
            *(_gallery(source, assignment, what, seed) if source else
              [("p", f"No gallery: the training images do not read back ({why_no_source}).")]),
            ("p", f"The {what}: {len(counts)} non-empty clusters of "
                  f"{int((assignment >= 0).sum())} images; sizes from {counts[-1]} to "
                  f"{counts[0]}, median {int(np.median(counts))}. The largest:"),
            *_cluster_table(assignment, _labels(run, source, len(assignment)),
                            source.class_names if source else None),
            ("img", plot("cluster_sizes.png", f"Cluster sizes ({what})",
                         "cluster (largest first)", "images",
                         [(what, np.arange(1, len(counts) + 1), counts)], log_y=True))]


def run_blocks(model_dir: str, source=None) -> list:
    """The blocks of MODEL_DIR's report page: what the run is, its clusters, its training, the
    skipped images and the configuration. `source`: the run's images when they are open already
    (else opened from the configuration for the gallery)."""
    from dc_tf.config import ConfigError
    from dc_tf.visualization.trained import load_config, open_source  # load TensorFlow
    cfg, run = load_config(model_dir), RunDir(model_dir)
    why_no_source = ""
    if source is None:
        try:
            source = open_source(cfg)
        except (OSError, ConfigError) as e:  # a folder moved or deleted since the run
            why_no_source = str(e)
    rows = run.read_metrics()
    final = run.final_figures_or_none()
    status = ("finished, exported to " + run.export
              if final is not None and os.path.isdir(run.export)
              else f"{len(rows)} of {cfg.epochs} epochs trained")
    method, k = cfg.describe()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks = [("h1", f"dc_tf run {model_dir}"),
              ("p", f"{method}, {cfg.arch}, {k}, on {cfg.dataset} ({cfg.num_examples} images); "
                    f"{status}. Written {stamp}.")]
    if final is not None:
        blocks.append(("p", "Final clustering: " + ", ".join(
            f"{key} {figure(value)}" for key, value in final.items()) + "."))
    return [*blocks, *_clusters(run, source, why_no_source, (cfg.seed, len(rows))),
            *_training(rows),
            ("h2", "Skipped images"), *_skipped(run),
            ("h2", "Configuration"),
            ("table", ["flag", "value"], [[key, json.dumps(value)] for key, value in
                                          sorted(dataclasses.asdict(cfg).items())])]


def write_run_report(model_dir: str, source=None) -> str:
    """Writes the run's report page (atomically); returns its path. `source` as in run_blocks."""
    path = RunDir(model_dir).report
    fileio.atomic_write(path, html_page(f"dc_tf run {model_dir}",
                                        run_blocks(model_dir, source)))
    return path


class ReportCallback(keras.callbacks.Callback):
    """Rewrites the run's report page after every epoch; list it after the RunLogger, which
    appends the epoch's metrics row. A report that fails to render is logged and
    skipped: it never stops a run."""

    def __init__(self, model_dir: str, source):
        super().__init__()
        self.model_dir, self.source = model_dir, source

    def on_epoch_end(self, epoch, logs=None):
        try:
            write_run_report(self.model_dir, self.source)
        except Exception as e:  # noqa: BLE001  the report is a view; training goes on
            logging.warning("the report of epoch %d was not written: %s", epoch, e)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m dc_tf.report MODEL_DIR")
    model_dir = argv[1]
    console.quiet_library_info()
    if not RunDir(model_dir).has_run():
        sys.exit(f"error: {model_dir} holds no dc_tf.train run (no config.json): pass the "
                 "--model_dir of a training run")
    path = write_run_report(model_dir)
    logging.info("wrote %s", path)
    print(f"report: {os.path.abspath(path)}")


if __name__ == "__main__":
    app.run(main)
