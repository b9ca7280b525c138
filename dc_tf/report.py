r"""A training run's report page, and the HTML/markdown rendering the pipelines' report shares.

    python -m dc_tf.report runs/fashion_mnist          # rebuilds runs/fashion_mnist/report.html

dc_tf.train rewrites MODEL_DIR/report.html after every epoch and at the end; this command
rebuilds it for any run, finished or not. The page is one static file that opens from disk
(plots and montages are embedded as data: URIs, no script, no network): what the run is and its
final figures; a gallery of clusters (montages with each cluster's size and, with labels, its
majority class and purity), the largest clusters and the cluster sizes; the training curves
(loss, pseudo-label accuracy, k-means loss, NMI with the previous clustering and with the labels
when known, time per phase) and the epochs' figures; the skipped images with their reasons; and
the configuration.

A page is a list of blocks, each a tuple: ("h1" | "h2" | "p", text), ("table", header, rows)
with rows of strings, ("md", caption and pipe table as eval.linear_probe.markdown_table writes
it), or ("img", Image). `html_page` and `markdown_page` render the same blocks.
"""

import base64
import csv
import dataclasses
import datetime
import html
import io
import json
import os
import re
import sys

from dc_tf import console

console.quiet_tensorflow_startup()  # as a program: before TensorFlow loads (through Keras)

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, logging  # noqa: E402

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from dc_core import fileio  # noqa: E402
from dc_tf.clusters import cluster_table, load_examples  # noqa: E402
from dc_tf.console import figure  # noqa: E402

REPORT = "report.html"
GALLERY_CLUSTERS = 12  # clusters drawn for the gallery
SKIPPED_SHOWN = 50  # rows of skipped.tsv listed
LARGEST_SHOWN = 10  # clusters listed with their majority class
# metrics.jsonl fields drawn as curves: (plot title, y label, fields)
_CURVES = (("Training loss", "loss", ("loss",)),
           ("Pseudo-label accuracy (training crops)", "accuracy", ("accuracy",)),
           ("k-means loss", "loss", ("kmeans_loss",)),
           ("NMI of the clustering", "NMI", ("nmi_prev", "nmi_labels")),
           ("Time per phase", "seconds", ("time_features_s", "time_cluster_s", "time_train_s")))


@dataclasses.dataclass(frozen=True)
class Image:
    """A PNG of a page: `name` is its file name where it is written beside a markdown page."""
    name: str
    alt: str
    png: bytes


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1 or 3] as PNG bytes."""
    buffer = io.BytesIO()
    PILImage.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def plot(name: str, title: str, xlabel: str, ylabel: str, series: list,
         log_y: bool = False) -> Image:
    """One line per (label, x, y) of `series`, as an Image called `name`."""
    return panels(name, title, [(title, xlabel, ylabel, series, log_y)])


def panels(name: str, alt: str, specs: list, columns: int = 3) -> Image:
    """A grid of plots in one Image (one figure renders much faster than several): each spec is
    (title, xlabel, ylabel, series, log_y), series as in `plot`."""
    rows = -(-len(specs) // columns)
    width = min(len(specs), columns)
    fig, axes = plt.subplots(rows, width, figsize=(4.6 * width, 3.2 * rows), squeeze=False)
    for ax, (title, xlabel, ylabel, series, log_y) in zip(axes.flat, specs):
        for label, x, y in series:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, ranks
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(specs):]:
        ax.set_visible(False)
    # Fixed margins: matplotlib's tight layout doubles the time of a figure.
    fig.subplots_adjust(left=0.9 / (4.6 * width), right=1 - 0.15 / (4.6 * width),
                        bottom=0.55 / (3.2 * rows), top=1 - 0.35 / (3.2 * rows),
                        wspace=0.3, hspace=0.45)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return Image(name, alt, buffer.getvalue())


def markdown_page(blocks: list) -> str:
    """The blocks as markdown; images are linked by their name."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind in ("p", "md"):
            out.append(args[0])
        elif kind == "table":
            header, rows = args
            out.append("\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
                                 + ["| " + " | ".join(row) + " |" for row in rows]))
        elif kind == "img":
            out.append(f"![{args[0].alt}]({args[0].name})")
    return "\n\n".join(out) + "\n"


def _html_table(header: list, rows: list) -> str:
    def cells(row, tag):
        return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)
    return ("<table><tr>" + cells(header, "th") + "</tr>"
            + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows) + "</table>")


def html_page(title: str, blocks: list) -> str:
    """The blocks as one self-contained HTML page: images embedded as data: URIs."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(args[0])}</p>")
        elif kind == "md":  # a caption paragraph, then a pipe table
            lines = args[0].splitlines()
            text = " ".join(line for line in lines if line and not line.startswith("|"))
            rows = [[c.strip() for c in line.strip("|").split("|")]
                    for line in lines if line.startswith("|") and not line.startswith("|---")]
            out.append(f"<p>{html.escape(text)}</p>" + _html_table(rows[0], rows[1:]))
        elif kind == "table":
            out.append(_html_table(*args))
        elif kind == "img":
            data = base64.b64encode(args[0].png).decode("ascii")
            # Inline: consecutive plots sit side by side where the page is wide enough.
            out.append(f'<img src="data:image/png;base64,{data}" '
                       f'alt="{html.escape(args[0].alt)}">')
    style = ("body{font-family:sans-serif;max-width:66em;margin:auto}table{border-collapse:"
             "collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%;vertical-align:top;margin:0.3em 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(out)
            + "\n</body></html>\n")


# ------------------------------------------------------------------------------ a run's page

def read_metrics(model_dir: str) -> list:
    """The rows of MODEL_DIR/metrics.jsonl ([] for a run without epochs); a torn last line (a
    run killed while appending) is left out."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def last_assignment(model_dir: str):
    """(what, int32 [N] pseudo-labels) of the newest clustering of a run ("final clustering" or
    "epoch E"), else None. Supervised runs have none: their "assignments" are the labels."""
    with open(os.path.join(model_dir, "config.json")) as f:
        if json.load(f).get("supervised"):
            return None
    folder = os.path.join(model_dir, "assignments")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    epochs = [n for n in names if re.fullmatch(r"epoch_\d+\.npy", n)]
    for name, what in (("final.npy", "final clustering"),
                       *((n, f"epoch {int(n[6:-4])}") for n in reversed(epochs))):
        if name in names:
            try:
                return what, np.load(os.path.join(folder, name))
            except (OSError, ValueError, EOFError):
                continue  # a damaged file: the one before it
    return None


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


def _skipped(model_dir: str) -> list:
    path = os.path.join(model_dir, "skipped.tsv")
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


def _labels(model_dir: str, source, n: int) -> np.ndarray:
    """The ground-truth labels of the clustered images: the open source's when it has them (no
    read of examples.tsv at every epoch), else examples.tsv's."""
    if source is not None and source.labels is not None and len(source.labels) == n:
        return source.labels
    return load_examples(model_dir, n)[1]


def _clusters(model_dir: str, source, why_no_source: str, seed) -> list:
    last = last_assignment(model_dir)
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
            *_cluster_table(assignment, _labels(model_dir, source, len(assignment)),
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
    cfg = load_config(model_dir)
    why_no_source = ""
    if source is None:
        try:
            source = open_source(cfg)
        except (OSError, ConfigError) as e:  # a folder moved or deleted since the run
            why_no_source = str(e)
    rows = read_metrics(model_dir)
    final_path = os.path.join(model_dir, "final_clustering.json")
    final = None
    if os.path.exists(final_path):
        with open(final_path) as f:
            final = json.load(f)
    status = ("finished, exported to " + os.path.join(model_dir, "export")
              if final is not None and os.path.isdir(os.path.join(model_dir, "export"))
              else f"{len(rows)} of {cfg.epochs} epochs trained")
    method = "DeepCluster-v2" if cfg.method == "deepcluster_v2" else (
        "supervised baseline" if cfg.supervised else "DeepCluster")
    k = (f"{'/'.join(map(str, cfg.num_prototypes))} prototypes"
         if cfg.method == "deepcluster_v2" else f"k = {cfg.num_clusters}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks = [("h1", f"dc_tf run {model_dir}"),
              ("p", f"{method}, {cfg.arch}, {k}, on {cfg.dataset} ({cfg.num_examples} images); "
                    f"{status}. Written {stamp}.")]
    if final is not None:
        blocks.append(("p", "Final clustering: " + ", ".join(
            f"{key} {figure(value)}" for key, value in final.items()) + "."))
    return [*blocks, *_clusters(model_dir, source, why_no_source, (cfg.seed, len(rows))),
            *_training(rows),
            ("h2", "Skipped images"), *_skipped(model_dir),
            ("h2", "Configuration"),
            ("table", ["flag", "value"], [[key, json.dumps(value)] for key, value in
                                          sorted(dataclasses.asdict(cfg).items())])]


def write_run_report(model_dir: str, source=None) -> str:
    """Writes MODEL_DIR/report.html (atomically); returns its path. `source` as in run_blocks."""
    path = os.path.join(model_dir, REPORT)
    fileio.atomic_write(path, html_page(f"dc_tf run {model_dir}",
                                        run_blocks(model_dir, source)))
    return path


class ReportCallback(keras.callbacks.Callback):
    """Rewrites MODEL_DIR/report.html after every epoch; list it after the RunLogger, which
    appends the epoch's row to metrics.jsonl. A report that fails to render is logged and
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
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        sys.exit(f"error: {model_dir} holds no dc_tf.train run (no config.json): pass the "
                 "--model_dir of a training run")
    path = write_run_report(model_dir)
    logging.info("wrote %s", path)
    print(f"report: {os.path.abspath(path)}")


if __name__ == "__main__":
    app.run(main)
