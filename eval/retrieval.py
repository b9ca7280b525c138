r"""Instance retrieval on Oxford5k / Paris6k and their revisited versions (paper Table 5).

    python -m eval.retrieval --model=runs/vgg16/export --dataset=roxford5k \
        --data_dir=/data/retrieval --output=runs/vgg16/roxford5k.json
    python -m eval.retrieval --model=runs/vgg16/export --dataset=rparis6k \
        --data_dir=/data/retrieval --output=runs/vgg16/rparis6k.json --save_ranks
    python -m eval.retrieval --model=runs/vgg16/export --dataset=roxford5k \
        --data_dir=/data/retrieval --whitening=runs/vgg16/roxford5k_whitening.npz \
        --distractors=/data/retrieval/revisitop1m/jpg --output=runs/vgg16/roxford5k_r1m.json

Reads the network only through its SavedModel's `conv_features` signature (eval.rmac). Data,
one folder per dataset under --data_dir: revisited, DATASET/gnd_DATASET.pkl and
DATASET/jpg/NAME.jpg; classic, DATASET/jpg/**/NAME.jpg with the original NAME_{good,ok,junk,
query}.txt in DATASET/gt, DATASET/lab or DATASET (or cirtorch's gnd_DATASET.pkl with ok/junk).
Descriptors (docs/protocols.md §6): --pooling (R-MAC, 3 levels) over --layer (default: the last conv
endpoint, conv5 = conv5_3 after ReLU for VGG16) of images whose longer side is --max_size times
each of --scales. Revisited queries: the original cropped by its box, then resized by the whole
image's factor (cirtorch's crop, on the 1024-px originals); classic ones: the scaled box cut out
of the resized image (deepcluster's eval_retrieval.py), the query staying in the database.
Whitening: PCA on the regional vectors of --whiten_on's database (auto: Oxford <-> Paris), saved
as OUTPUT_whitening.npz, reusable with --whitening. An exact FAISS inner-product index over the
database (and --distractors) ranks all of it for each query; eval.metrics scores classic mAP or
revisited Easy/Medium/Hard mAP and mP@{1,5,10}. Writes --output (JSON), TensorBoard scalars
under --logdir and a markdown table; --save_ranks adds OUTPUT_ranks.npz (top 1000 per query) and
a montage OUTPUT_ranks.png. Undecodable database images are left out of the database and the
ground truth (as deepcluster's corrupt Paris images) and listed in the JSON.
"""

import dataclasses
import glob
import math
import os
import pickle
import re
import time

import faiss
import numpy as np
import tensorflow as tf
from absl import flags, logging

from dc_core.errors import ConfigError
from eval import cli, metrics, rmac

DATASETS = ("roxford5k", "rparis6k", "oxford5k", "paris6k")
REVISITED = ("roxford5k", "rparis6k")
OTHER = {"roxford5k": "rparis6k", "rparis6k": "roxford5k", "oxford5k": "paris6k",
         "paris6k": "oxford5k"}
KAPPAS = (1, 5, 10)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SAVED_RANKS, MONTAGE_QUERIES, MONTAGE_TOP = 1000, 6, 10


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """One run's settings; fields are the flags."""
    model: str
    dataset: str
    data_dir: str
    output: str
    name: str = ""
    layer: str = ""
    pooling: str = "rmac"
    levels: int = 3
    gem_p: float = 3.0
    max_size: int = 1024
    scales: tuple = (1.0,)
    whiten_on: str = "auto"
    whitening: str = ""
    whiten_dim: int = 0
    distractors: str = ""
    save_ranks: bool = False
    logdir: str = ""


_HELP = {
    "dataset": f"One of {', '.join(DATASETS)}.",
    "data_dir": "Folder holding one sub-folder per dataset (see the module docstring).",
    "name": "Table label of the model (default: --model).",
    "layer": "Conv endpoint to pool (default: the export's last one).",
    "pooling": f"Descriptor: {', '.join(rmac.POOLINGS)}.",
    "levels": "R-MAC levels.",
    "gem_p": "GeM exponent p.",
    "max_size": "Resize every image so that its longer side is this many pixels.",
    "scales": "Comma-separated factors of --max_size; >1 value: multi-scale descriptors.",
    "whiten_on": "Dataset whose database the whitening is learned on: auto (the other one of "
                 "Oxford/Paris), none, or a dataset name.",
    "whitening": "A *_whitening.npz of an earlier run to reuse (instead of --whiten_on).",
    "whiten_dim": "Whitened dimensions kept (0 = all).",
    "distractors": "Folder of distractor images added to the database (e.g. R1M).",
    "save_ranks": "Also write OUTPUT_ranks.npz and a montage OUTPUT_ranks.png.",
}


def validate(cfg: RetrievalConfig) -> RetrievalConfig:
    """Checks the flag values that need no data; resolves name, whiten_on and logdir."""
    cli.require_given(cfg, model="MODEL_DIR/export", data_dir="PATH", output="FILE.json")
    cli.choice("dataset", cfg.dataset, DATASETS)
    cli.choice("pooling", cfg.pooling, rmac.POOLINGS)
    cli.choice("whiten_on", cfg.whiten_on, ("auto", "none") + DATASETS)
    cli.check_each(cfg, ("levels", "gem_p", "max_size"))
    if not cfg.scales or min(cfg.scales) <= 0:
        raise ConfigError(f"--scales={','.join(map(str, cfg.scales))} must be positive numbers")
    if cfg.whiten_dim < 0:
        raise ConfigError(f"--whiten_dim={cfg.whiten_dim} must be 0 (all) or positive")
    for flag in ("whitening", "distractors"):
        path = getattr(cfg, flag)
        if path and not os.path.exists(path):
            raise ConfigError(f"--{flag}={path} does not exist; check the path")
    whiten_on = OTHER[cfg.dataset] if cfg.whiten_on == "auto" else cfg.whiten_on
    if cfg.whitening:
        whiten_on = ""
    elif whiten_on == cfg.dataset:
        logging.warning("--whiten_on=%s learns the whitening on the evaluated dataset; the "
                        "protocol learns it on the other one", whiten_on)
    return dataclasses.replace(cfg, name=cfg.name or cfg.model, whiten_on=whiten_on,
                               logdir=cli.default_logdir(cfg))


# ------------------------------------------------------------------------------ datasets

@dataclasses.dataclass
class RetrievalSet:
    """A benchmark read from disk.

    Attributes: name; revisited, the protocol; images, database image paths; names, their
    names; queries, [(path, float64 box [x1, y1, x2, y2] in original pixels)]; query_names;
    gnd, per query a dict of int64 database indices: easy/hard/junk (revisited) or ok/junk
    (classic, ok = good ∪ ok).
    """
    name: str
    revisited: bool
    images: list
    names: list
    queries: list
    query_names: list
    gnd: list


def _image_files(folder: str) -> dict:
    """name (file name without extension) -> path of every image below `folder`, sorted."""
    paths = sorted(p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    return {os.path.splitext(os.path.basename(p))[0]: p for p in paths}


def read_dataset(data_dir: str, name: str) -> RetrievalSet:
    """Reads DATA_DIR/NAME in the revisited (pickle) or classic (text files) layout."""
    root = os.path.join(data_dir, name)
    pkl = os.path.join(root, f"gnd_{name}.pkl")
    revisited = name in REVISITED
    if os.path.exists(pkl):
        return _read_pickle(pkl, root, name, revisited)
    gt_dir = next((d for d in (os.path.join(root, "gt"), os.path.join(root, "lab"), root)
                   if glob.glob(os.path.join(d, "*_query.txt"))), None)
    if revisited or gt_dir is None:
        raise ConfigError(
            f"--data_dir={data_dir}: no {pkl}{'' if revisited else ' and no *_query.txt files'}"
            f"; put {name} there as the module docstring says (ground truth and images: "
            "http://cmp.felk.cvut.cz/revisitop/)")
    return _read_classic(gt_dir, root, name)


def _read_pickle(pkl: str, root: str, name: str, revisited: bool) -> RetrievalSet:
    keys = ("easy", "hard", "junk") if revisited else ("ok", "junk")
    try:
        with open(pkl, "rb") as f:
            cfg = pickle.load(f)
        images, queries = list(cfg["imlist"]), list(cfg["qimlist"])
        gnd = [{k: np.asarray(g[k], np.int64).ravel() for k in keys} for g in cfg["gnd"]]
        boxes = [np.asarray(g["bbx"], np.float64).reshape(4) for g in cfg["gnd"]]
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--dataset={name}: {pkl} is not a ground-truth pickle with imlist, "
                          f"qimlist and gnd ({', '.join(keys)}, bbx per query): "
                          f"{type(e).__name__}: {e}") from e
    if len(gnd) != len(queries):
        raise ConfigError(f"--dataset={name}: {pkl} has {len(queries)} queries and "
                          f"{len(gnd)} ground-truth entries")
    path = lambda n: os.path.join(root, "jpg", n + ".jpg")  # noqa: E731
    return RetrievalSet(name, revisited, [path(n) for n in images], images,
                        [(path(q), b) for q, b in zip(queries, boxes)], queries, gnd)


def _read_classic(gt_dir: str, root: str, name: str) -> RetrievalSet:
    files = _image_files(os.path.join(root, "jpg"))
    if not files:
        raise ConfigError(f"--dataset={name}: no images below {os.path.join(root, 'jpg')}")
    names, lookup = list(files), {n: i for i, n in enumerate(files)}
    queries, query_names, gnd, unknown = [], [], [], set()

    def words(query, kind):
        path = os.path.join(gt_dir, f"{query}_{kind}.txt")
        if not os.path.exists(path):
            raise ConfigError(f"--dataset={name}: {path} is missing; the classic ground truth "
                              "has good, ok, junk and query files for every query")
        with open(path) as f:
            return f.read().split()

    def indices(query, *kinds):
        listed = [n for kind in kinds for n in words(query, kind)]
        unknown.update(n for n in listed if n not in lookup)
        return np.array(sorted({lookup[n] for n in listed if n in lookup}), np.int64)

    for query_file in sorted(glob.glob(os.path.join(gt_dir, "*_query.txt"))):
        query = os.path.basename(query_file)[:-len("_query.txt")]
        fields = words(query, "query")
        image = re.sub(r"^oxc1_", "", fields[0])  # Oxford prefixes query images with oxc1_
        if image not in lookup or len(fields) != 5:
            raise ConfigError(f"--dataset={name}: {query_file} should read 'IMAGE x1 y1 x2 y2' "
                              f"with IMAGE below {os.path.join(root, 'jpg')}; it reads "
                              f"{' '.join(fields)!r}")
        queries.append((files[image], np.array([float(x) for x in fields[1:]])))
        query_names.append(query)
        gnd.append({"ok": indices(query, "good", "ok"), "junk": indices(query, "junk")})
    if unknown:
        logging.warning("%s: %d images named in the ground truth are not in the image folder "
                        "and are left out", name, len(unknown))
    return RetrievalSet(name, False, list(files.values()), names, queries, query_names, gnd)


# ------------------------------------------------------------------------------ descriptors

def _whitening(cfg: RetrievalConfig, export, spec, learn_set) -> tuple:
    """(PCAWhitening or None, its JSON record): loaded from --whitening, or learned and saved."""
    settings = {"model": cfg.model, "layer": export.layer, **dataclasses.asdict(spec),
                "scales": list(spec.scales)}
    if cfg.whitening:
        whitening, meta = rmac.load_whitening(cfg.whitening, settings, export.dim)
        return whitening, {**meta, "file": cfg.whitening}
    if learn_set is None:
        return None, None
    whitening, counts = rmac.learn_whitening(export, learn_set.images, spec, cfg.whiten_dim,
                                             f"whitening vectors of {learn_set.name}")
    meta = {**settings, "learned_on": learn_set.name, **counts, "dim": whitening.output_dim}
    path = os.path.splitext(cfg.output)[0] + "_whitening.npz"
    return whitening, {**meta, "file": rmac.save_whitening(path, whitening, meta)}


def search(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """int64 [Q, N] every database row ranked by inner product, best first (exact FAISS)."""
    index = faiss.IndexFlatIP(database.shape[1])
    index.add(np.ascontiguousarray(database, np.float32))
    return index.search(np.ascontiguousarray(queries, np.float32), len(database))[1]


def _scores(ranks: np.ndarray, data: RetrievalSet) -> dict:
    """The protocol's metrics, per-query APs as {query name: AP or None}."""
    def clean(result):
        aps = [None if math.isnan(a) else float(a) for a in result.pop("aps")]
        return {**result, "aps": dict(zip(data.query_names, aps))}
    if data.revisited:
        return {k: clean(v) for k, v in metrics.revisited_retrieval_map(
            ranks, data.gnd, KAPPAS).items()}
    return clean(metrics.classic_retrieval_map(ranks, data.gnd))


# ------------------------------------------------------------------------------ the run

def run(cfg: RetrievalConfig) -> dict:
    """Evaluates the export of `cfg` on its dataset and writes the JSON; returns the report."""
    cfg = validate(cfg)
    cli.log_config(cfg)
    start = tick = time.time()
    timings = {}

    def lap(key):
        nonlocal tick
        timings[key], tick = time.time() - tick, time.time()

    # Whatever is wrong with the flags or the data fails here, before any image is read.
    data = read_dataset(cfg.data_dir, cfg.dataset)
    learn_set = (read_dataset(cfg.data_dir, cfg.whiten_on)  # "": --whitening is read instead
                 if cfg.whiten_on not in ("", "none") else None)
    distractors = list(_image_files(cfg.distractors).values()) if cfg.distractors else []
    export = rmac.ConvExport(cfg.model, cfg.layer)
    spec = rmac.DescriptorSpec(cfg.pooling, cfg.levels, cfg.gem_p, cfg.max_size, cfg.scales)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)

    whitening, whitening_record = _whitening(cfg, export, spec, learn_set)
    lap("whitening_s")
    images = data.images + distractors
    database, kept = rmac.descriptors(export, [(p, None) for p in images], spec, whitening,
                                      False, f"{data.name} database")
    lap("database_s")
    queries, found = rmac.descriptors(export, data.queries, spec, whitening, data.revisited,
                                      f"{data.name} queries")
    if not found.all():
        missing = [n for n, ok in zip(data.query_names, found) if not ok]
        raise ConfigError(f"--dataset={data.name}: queries {', '.join(missing)} could not be "
                          "read or have an empty box; check their images")
    lap("queries_s")
    ids = np.flatnonzero(kept)
    if not ids.size:
        raise ConfigError(f"--dataset={data.name}: none of the {len(images)} database images "
                          "could be read; check the jpg folder")
    ranks = ids[search(database[ids], queries)]
    # Left-out images are left out of the ground truth too (deepcluster's corrupt Paris list).
    data.gnd = [{k: v[np.isin(v, ids)] for k, v in g.items()} for g in data.gnd]
    scores = _scores(ranks, data)
    lap("search_and_scores_s")

    report = {"program": "eval.retrieval", "config": dataclasses.asdict(cfg), "name": cfg.name,
              "model": cfg.model, "dataset": data.name,
              "protocol": "revisited" if data.revisited else "classic",
              "layer": export.layer, "descriptor": {**dataclasses.asdict(spec),
                                                    "dim": int(database.shape[1])},
              "whitening": whitening_record, "num_database": len(ids),
              "num_distractors": int(kept[len(data.images):].sum()),
              "num_queries": len(data.queries),
              "skipped_images": [images[i] for i in np.flatnonzero(~kept)],
              "upscaled_views": export.upscaled, "metrics": scores}
    if cfg.save_ranks:
        stem = os.path.splitext(cfg.output)[0]
        np.savez(stem + "_ranks.npz", ranks=ranks[:, :SAVED_RANKS].astype(np.int32),
                 database=np.array(data.names + distractors), queries=np.array(data.query_names))
        report["ranks"] = {"ranks": stem + "_ranks.npz",
                           "montage": save_montage(stem + "_ranks.png", data, images, ranks)}
    timings["total_s"] = time.time() - start
    report["timings"] = timings
    _write_scalars(cfg.logdir, scores, data.revisited)
    cli.write_report(cfg.output, report)
    return report


def _write_scalars(logdir: str, scores: dict, revisited: bool) -> None:
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for split, result in (scores.items() if revisited else [("classic", scores)]):
            for key, value in result.items():
                if key == "map" or key.startswith("mp@"):
                    tf.summary.scalar(f"retrieval/{split}/{key}", value, step=0)
    writer.close()


def save_montage(path: str, data: RetrievalSet, images: list, ranks: np.ndarray) -> str:
    """A PNG grid: per row a query crop and its top MONTAGE_TOP results, framed by status."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    colours = ({"easy": "green", "hard": "blue", "junk": "gray"} if data.revisited
               else {"ok": "green", "junk": "gray"})
    q_rows = np.unique(np.linspace(0, len(data.queries) - 1, MONTAGE_QUERIES).round().astype(int))
    top = min(MONTAGE_TOP, ranks.shape[1])
    fig, axes = plt.subplots(len(q_rows), top + 1, figsize=(1.6 * (top + 1), 1.7 * len(q_rows)),
                             squeeze=False)
    for row, q in zip(axes, q_rows):
        path_q, box = data.queries[q]
        cells = [(Image.open(path_q).crop(tuple(np.round(box))), "black", data.query_names[q])]
        for rank, i in enumerate(ranks[q, :top]):
            status = next((k for k in colours if i in data.gnd[q][k]), None)
            cells.append((Image.open(images[i]), colours.get(status, "red"),
                          f"{rank + 1}: {status or 'negative'}"))
        for ax, (image, colour, title) in zip(row, cells):
            image.thumbnail((256, 256))
            ax.imshow(image.convert("RGB"))
            ax.set_title(title, fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
            plt.setp(list(ax.spines.values()), edgecolor=colour, linewidth=3)
    legend = ", ".join(f"{c} {k}" for k, c in colours.items())
    fig.suptitle(f"{data.name}: query, top {top}; frame: {legend}, red negative", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def markdown_table(report: dict) -> str:
    """One row: mAP % (classic) or E/M/H mAP % and mP@k %, revisited."""
    m = report["metrics"]
    head = (f"Retrieval on {report['dataset']} ({report['protocol']} protocol), "
            f"{report['descriptor']['pooling']} on {report['layer']}, whitening "
            f"{(report['whitening'] or {}).get('learned_on', 'none')}:")
    if report["protocol"] == "classic":
        return "\n".join([head, "", "| model | mAP |", "|---|---|",
                          f"| {report['name']} | {100 * m['map']:.2f} |"])
    splits = ("easy", "medium", "hard")
    cells = [f"{100 * m[s]['map']:.2f}" for s in splits] + [
        " / ".join(f"{100 * m[s][f'mp@{k}']:.1f}" for k in KAPPAS) for s in splits]
    return "\n".join([head, "", "| model | E mAP | M mAP | H mAP | E mP@1/5/10 | M mP@1/5/10 "
                      "| H mP@1/5/10 |", "|---" * 7 + "|",
                      f"| {report['name']} | " + " | ".join(cells) + " |"])


# ------------------------------------------------------------------------------ command line

def _define_flags() -> None:
    """Defines one flag per RetrievalConfig field (here, so importing the module defines none)."""
    cli.define_flags(RetrievalConfig, _HELP, skip=("scales",),
                     required=("model", "dataset", "data_dir", "output"))
    flags.adopt_module_key_flags(cli)  # listed by --help as this program's
    flags.DEFINE_list("scales", ["1"], _HELP["scales"])


def _config_from_flags() -> RetrievalConfig:
    scales = flags.FLAGS.scales
    try:
        values = tuple(float(s) for s in scales)
    except ValueError as e:
        raise ConfigError(f"--scales={','.join(scales)}: expected numbers such as "
                          "1,0.7071,0.5") from e
    return RetrievalConfig(scales=values, **cli.flag_values(RetrievalConfig, skip=("scales",)))


def entry_point():
    cli.run_program(_define_flags, _config_from_flags, run, markdown_table)


if __name__ == "__main__":
    entry_point()
