r"""Linear probes per layer, a kNN probe and clustering quality of exported networks (Table 1).

    python -m eval.linear_probe --model=runs/fashion_mnist/export --dataset=fashion_mnist \
        --output=runs/eval/linear_probe.json
    python -m eval.linear_probe --dataset=fashion_mnist --output=runs/eval/table1.json \
        --model=runs/random/export --name=Random --model=runs/fashion_mnist/export \
        --name=DeepCluster --model=runs/supervised/export --name=Supervised
    python -m eval.linear_probe --model=runs/alexnet/export --dataset=tfds:imagenet2012 \
        --data_dir=/data/tfds --epochs=90 --augment --ten_crop --output=runs/alexnet/probe.json

Each --model is read only through its SavedModel and stays frozen. Each probed endpoint (default:
every conv*) is average-pooled to about 9k values (`pool_spec`) and flattened; a linear layer is
trained on it as docs/protocols.md §3 (deepcluster's eval_linear.py) says: SGD momentum 0.9, coupled
weight decay, lr_t = lr0 / sqrt(1 + lr0·wd·t), batch 256. Test top-1/top-5 are measured after
every epoch; the JSON has the last epoch and the best one (the paper's figures are the best).

Modes (the JSON's "mode"): "cached" (default) sends each split through the backbone once (centre
crop) and trains on the pooled features, held in memory up to --cache_budget_gb and beyond it in
np.memmap files under --cache_dir (default: the system's temporary folder) deleted after each
model; "augment" sends the protocol's training views (resize to --resize_size, centre crop of
that size, random crop, flip) through the backbone every epoch. Test views: the centre crop, or
with --ten_crop the centre and corners of the central --resize_size square and their flips,
softmax averaged (torchvision's TenCrop takes the corners of the whole resized image).
--resize_size=0 is round(S·256/224) for exports of S >= 224 px and S for smaller ones (probed at
the size their training feature pass used). --test_dataset="" is fashion_mnist:test for
fashion_mnist and tfds:NAME:validation for tfds:NAME[:SPLIT].

Also measured on L2-normalised centre-crop features (conv endpoints pooled as above): a
cosine-weighted kNN classifier (k=20, T=0.07) from the training to the test split on
--knn_layer, and FAISS k-means with k = the number of classes on the test split's
--cluster_layer, scored by NMI, ARI and Hungarian accuracy. k-means runs --kmeans_runs times,
from seeds --seed, --seed + 1, ...; the figures are those of the run of lowest objective (as
scikit-learn's n_init), and the JSON adds the mean and standard deviation of NMI over the runs
(on Fashion-MNIST, 0.01 to 0.035 from the k-means seed alone). Writes --output (JSON, rewritten
after each model; each model's "per_image" holds, for every test image in order, its label, its
k-means cluster and whether each figure got it right, from which pipelines.report draws bootstrap
intervals) and TensorBoard scalars under --logdir (default: OUTPUT_logs beside the JSON,
a sub-folder per model), and prints a markdown table.
"""

import dataclasses
import math
import os
import re
import tempfile
import time

import faiss
import numpy as np
import tensorflow as tf
from absl import flags, logging

from dc_core import transforms
from dc_core.clustering import kmeans, l2_normalize
from dc_core.datasets import open_source
from dc_core.errors import ConfigError
from eval import cli, metrics
from eval.features import (ExportedBackbone, FeatureStore, Progress, SplitFeatures,
                           extract_features, view_dataset)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """One run's settings; fields are the flags (--model and --name fill models and names)."""
    models: tuple
    output: str
    names: tuple = ()
    dataset: str = "fashion_mnist"
    test_dataset: str = ""
    data_dir: str = ""
    max_examples: int = 0
    max_test_examples: int = 0
    layers: tuple = ()
    knn_layer: str = ""
    cluster_layer: str = ""
    epochs: int = 10
    learning_rate: float = 0.01
    weight_decay: float = 1e-7
    momentum: float = 0.9
    batch_size: int = 256
    augment: bool = False
    ten_crop: bool = False
    resize_size: int = 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    kmeans_runs: int = 10
    seed: int = 31
    cache_dir: str = ""
    cache_budget_gb: float = 4.0
    logdir: str = ""


_HELP = {
    "models": "MODEL_DIR/export of a dc_tf.train run; repeat to compare several models.",
    "names": "Table label of each --model, in order (default: the paths).",
    "dataset": "Training split: fashion_mnist[:SPLIT], tfds:NAME[:SPLIT] or folder:PATH with "
               "one sub-folder per class.",
    "test_dataset": "Test split, same syntax ('' = derived, see the module docstring).",
    "data_dir": "Fashion-MNIST IDX folder or TFDS data dir.",
    "max_examples": "Use the first N training examples (0 = all).",
    "max_test_examples": "Use the first N test examples (0 = all).",
    "layers": "Endpoints to probe (default: every conv* endpoint).",
    "knn_layer": "Endpoint of the kNN probe (default: fc7, else the last endpoint).",
    "cluster_layer": "Endpoint clustered by k-means (default: --knn_layer).",
    "epochs": "Probe epochs (ImageNet protocol: 90).",
    "learning_rate": "Initial probe learning rate lr0.",
    "weight_decay": "Coupled L2 coefficient (docs/protocols.md §3: 1e-7).",
    "momentum": "SGD momentum of the probes.",
    "batch_size": "Probe batch size; also images per feature batch.",
    "augment": "Train on augmented views through the backbone every epoch (no feature cache).",
    "ten_crop": "Test on ten crops, softmax averaged, instead of the centre crop.",
    "resize_size": "Resize the shorter side to this before cropping (0 = see the docstring).",
    "knn_k": "Neighbours of the kNN probe.",
    "knn_temperature": "kNN votes weigh exp(cosine / temperature).",
    "kmeans_runs": "k-means runs from consecutive seeds; the clustering figures are the run of "
                   "lowest objective's.",
    "seed": "Seed of probe initialisation, example order, crops and the first k-means run.",
    "cache_dir": "Folder for the memmapped features beyond the budget.",
    "cache_budget_gb": "Features kept in memory, GiB; the rest is memmapped.",
}


def validate(cfg: ProbeConfig) -> ProbeConfig:
    """Checks the flag values that need no data and fills test_dataset, names and logdir."""
    if not cfg.models or not cfg.output:
        raise ConfigError("give at least one --model=MODEL_DIR/export and --output=FILE.json")
    if cfg.names and len(cfg.names) != len(cfg.models):
        raise ConfigError(f"{len(cfg.names)} --name values for {len(cfg.models)} --model values; "
                          "give one --name per --model or none")
    cli.check_each(cfg, ("epochs", "batch_size", "learning_rate", "knn_k", "knn_temperature",
                         "kmeans_runs"))
    test_dataset = cfg.test_dataset
    kind, _, rest = cfg.dataset.partition(":")
    if not test_dataset and kind == "fashion_mnist":
        test_dataset = "fashion_mnist:test"
    elif not test_dataset and kind == "tfds" and rest:
        test_dataset = f"tfds:{rest.partition(':')[0]}:validation"
    elif not test_dataset:
        raise ConfigError(f"--dataset={cfg.dataset} has no default test split; pass "
                          "--test_dataset (e.g. folder:PATH/val)")
    return dataclasses.replace(cfg, test_dataset=test_dataset, names=cfg.names or cfg.models,
                               logdir=cli.default_logdir(cfg))


# ------------------------------------------------------------------------------ the probes

class LinearProbe(tf.Module):
    """A linear layer trained as deepcluster's eval_linear.py trains its RegLog.

    torch.nn.Linear's initialisation U(±1/sqrt(dim)); torch.optim.SGD's update: coupled weight
    decay on weight and bias (g += wd·w), then heavy-ball momentum (v = m·v + g, w -= lr·v), with
    lr = lr0 / sqrt(1 + lr0·wd·t) at step t counted over all epochs.
    """

    def __init__(self, dim: int, num_classes: int, cfg: ProbeConfig):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.kernel = tf.Variable(tf.random.stateless_uniform(
            [dim, num_classes], [cfg.seed, 0], -bound, bound))
        self.bias = tf.Variable(tf.random.stateless_uniform(
            [num_classes], [cfg.seed, 1], -bound, bound))
        self.velocity = [tf.Variable(tf.zeros_like(v)) for v in (self.kernel, self.bias)]
        self.step = tf.Variable(0, dtype=tf.int64)
        self._hyper = cfg.learning_rate, cfg.weight_decay, cfg.momentum
        spec = tf.TensorSpec([None, dim], tf.float32)
        self.logits = tf.function(lambda x: x @ self.kernel + self.bias, input_signature=[spec])
        self.train_step = tf.function(self._train_step, input_signature=[
            spec, tf.TensorSpec([None], tf.int64)])

    def _train_step(self, x, labels):
        """One step on float32 [B, dim] features and int64 [B] labels; returns the mean loss."""
        lr0, wd, momentum = self._hyper
        lr = lr0 / tf.sqrt(1.0 + lr0 * wd * tf.cast(self.step, tf.float32))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels, self.logits(x)))
        params = [self.kernel, self.bias]
        for param, grad, velocity in zip(params, tape.gradient(loss, params), self.velocity):
            velocity.assign(momentum * velocity + grad + wd * param)
            param.assign_sub(lr * velocity)
        self.step.assign_add(1)
        return loss

    def probabilities(self, x: np.ndarray, views: int, batch_size: int) -> np.ndarray:
        """float32 [n, C] softmax averaged over each example's `views` consecutive rows of x."""
        chunk = batch_size * views
        probs = np.concatenate([tf.nn.softmax(self.logits(x[i:i + chunk])).numpy()
                                for i in range(0, len(x), chunk)])
        return probs.reshape(-1, views, probs.shape[-1]).mean(1)


def train_probes(batches, dims: dict, num_examples: int, num_classes: int, test: SplitFeatures,
                 cfg: ProbeConfig, writer) -> dict:
    """Trains one probe per layer on the same batches, scoring all on `test` after each epoch.

    Args:
        batches: epoch -> iterable of ({layer: float32 [B, dim]}, int64 [B] labels).
        dims: layer -> feature length.
    Returns:
        (layer -> [{"epoch", "loss", "top1", "top5"}, ...] one entry per epoch,
         layer -> {"top1_last", "top5_last", "top1_best", "top5_best"}: bool [M] hits of every
         test example at the last and at the best (first highest top-1) epoch).
    """
    probes = {layer: LinearProbe(dim, num_classes, cfg) for layer, dim in dims.items()}
    histories = {layer: [] for layer in dims}
    hits = {layer: {} for layer in dims}
    for epoch in range(1, cfg.epochs + 1):
        losses, progress = {layer: [] for layer in dims}, Progress(f"epoch {epoch}", num_examples)
        for flat, labels in batches(epoch):
            for layer, probe in probes.items():
                losses[layer].append(probe.train_step(flat[layer], labels).numpy())
            progress.update(len(labels))
        for layer, probe in probes.items():
            loss = float(np.mean(losses[layer]))
            if not math.isfinite(loss):
                raise ConfigError(f"the {layer} probe's loss became {loss} in epoch {epoch}; "
                                  f"lower --learning_rate (now {cfg.learning_rate})")
            probs = probe.probabilities(test.arrays[layer], test.views, cfg.batch_size)
            hit1, hit5 = (metrics.top_k_hits(probs, test.labels, k) for k in (1, 5))
            top1, top5 = float(hit1.mean()), float(hit5.mean())
            if not histories[layer] or top1 > max(h["top1"] for h in histories[layer]):
                hits[layer].update(top1_best=hit1, top5_best=hit5)
            hits[layer].update(top1_last=hit1, top5_last=hit5)
            histories[layer].append({"epoch": epoch, "loss": loss, "top1": top1, "top5": top5})
            with writer.as_default():
                for key in ("loss", "top1", "top5"):
                    tf.summary.scalar(f"probe/{layer}/{key}", histories[layer][-1][key], step=epoch)
            logging.info("%s epoch %d/%d: loss %.4f, top-1 %.2f%%, top-5 %.2f%%", layer, epoch,
                         cfg.epochs, loss, 100 * top1, 100 * top5)
    return histories, hits


# ------------------------------------------------------------------------------ kNN and k-means

def knn_scores(train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray, k: int,
               temperature: float, num_classes: int) -> np.ndarray:
    """Cosine-weighted kNN votes, float64 [M, C], for float [M, d] test and [N, d] train rows.

    The k most similar training rows come from an exact FAISS inner-product index on
    L2-normalised features; `metrics.knn_class_scores` weighs their votes.
    """
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    index = faiss.IndexFlatIP(train_x.shape[1])
    index.add(train_x)
    similarities, neighbours = index.search(test_x, min(k, len(train_x)))
    return metrics.knn_class_scores(similarities, train_labels[neighbours], num_classes,
                                    temperature)


def clustering_quality(x: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
                       runs: int) -> tuple:
    """Clustering quality of FAISS k-means (k = num_classes) on L2-normalised float [n, d] rows.

    k-means runs `runs` times, from seeds seed, seed + 1, ...; returns NMI, ARI and ACC of the
    run of lowest objective, with the mean and standard deviation of NMI over all runs, and the
    int [n] clusters of that run.
    """
    x = l2_normalize(x)
    results = [kmeans(x, num_classes, seed=seed + i) for i in range(runs)]
    nmis = [metrics.nmi(labels, r.labels) for r in results]
    i = int(np.argmin([r.loss for r in results]))  # the first of equal objectives
    best = results[i]
    return {"nmi": nmis[i],
            "ari": metrics.adjusted_rand_index(labels, best.labels),
            "acc": metrics.clustering_accuracy(labels, best.labels),
            "kmeans_runs": runs, "nmi_mean": float(np.mean(nmis)),
            "nmi_sd": float(np.std(nmis))}, best.labels


def per_image_record(labels: np.ndarray, cluster: np.ndarray, hits: dict) -> dict:
    """The per-image results of one model for JSON: each a string of space-separated integers,
    one per test image in test order (compact, and one line even in indented JSON).

    Args:
      labels: int [M] test labels; cluster: int [M] k-means cluster of each test image.
      hits: figure name (knn_top1, top1_best:conv1, ...) -> bool [M], 1 where the figure counted
        the image as right.
    """
    arrays = {"labels": labels, "cluster": cluster, **hits}
    return {name: " ".join(map(str, np.asarray(a, np.int64).tolist()))
            for name, a in arrays.items()}


# ------------------------------------------------------------------------------ a model, the run

def _plan(backbone: ExportedBackbone, cfg: ProbeConfig) -> tuple:
    """(probe layers, knn layer, cluster layer, resize size) for an export, checked up front."""
    layers = cfg.layers or tuple(n for n in backbone.shapes if n.startswith("conv"))
    knn_layer = cfg.knn_layer or ("fc7" if "fc7" in backbone.shapes else list(backbone.shapes)[-1])
    cluster_layer = cfg.cluster_layer or knn_layer
    for flag, names in (("layers", layers), ("knn_layer", [knn_layer]),
                        ("cluster_layer", [cluster_layer])):
        backbone.require(names, flag)
    if not layers:
        raise ConfigError(f"{backbone.path} has no conv* endpoint; pass --layers")
    size = backbone.image_size
    resize_size = cfg.resize_size or transforms.default_resize_size(size)
    if resize_size < size:
        raise ConfigError(f"--resize_size={resize_size} is below the export's image size {size}")
    return tuple(layers), knn_layer, cluster_layer, resize_size


def evaluate_model(backbone: ExportedBackbone, name: str, train_source, test_source,
                   cfg: ProbeConfig) -> dict:
    """Probes, kNN and clustering of one export; returns its JSON record."""
    start = tick = time.time()
    timings = {}

    def lap(key):
        nonlocal tick
        timings[key], tick = time.time() - tick, time.time()

    layers, knn_layer, cluster_layer, resize_size = _plan(backbone, cfg)
    writer = tf.summary.create_file_writer(
        os.path.join(cfg.logdir, re.sub(r"[^\w.-]+", "_", name).strip("_")))
    with tempfile.TemporaryDirectory(prefix="linear_probe_", dir=cfg.cache_dir or None) as tmp:
        store = FeatureStore(cfg.cache_budget_gb * 2**30, tmp)
        test = extract_features(backbone, test_source, tuple(dict.fromkeys(
            layers + (knn_layer, cluster_layer))), resize_size, cfg.ten_crop, cfg.batch_size,
            store, "test")
        lap("features_test_s")
        train_layers = (knn_layer,) if cfg.augment else tuple(dict.fromkeys(layers + (knn_layer,)))
        train = extract_features(backbone, train_source, train_layers, resize_size, False,
                                 cfg.batch_size, store, "train")
        lap("features_train_s")
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        rng = np.random.default_rng(cfg.seed)

        def cached(epoch):
            order = rng.permutation(len(train.labels))
            for i in range(0, len(order), cfg.batch_size):
                rows = np.sort(order[i:i + cfg.batch_size])  # a memmap reads sorted rows faster
                yield {layer: train.arrays[layer][rows] for layer in layers}, train.labels[rows]

        def augmented(epoch):
            random_access = train_source.random_access
            for images, labels in view_dataset(
                    train_source, backbone, resize_size, "augment", cfg.batch_size,
                    seed=int(rng.integers(2**31)),
                    order=rng.permutation(train_source.num_examples) if random_access else None):
                yield backbone.features(images, layers), labels

        histories, probe_hits = train_probes(augmented if cfg.augment else cached,
                                 {layer: backbone.dim(layer) for layer in layers},
                                 train_source.num_examples, num_classes, test, cfg, writer)
        lap("probes_s")
        votes = knn_scores(train.centre(knn_layer), train.labels, test.centre(knn_layer),
                           cfg.knn_k, cfg.knn_temperature, num_classes)
        knn_hits = {f"knn_top{k}": metrics.top_k_hits(votes, test.labels, k) for k in (1, 5)}
        knn = {"layer": knn_layer, "k": cfg.knn_k, "temperature": cfg.knn_temperature,
               **{f"top{k}": float(knn_hits[f"knn_top{k}"].mean()) for k in (1, 5)}}
        lap("knn_s")
        quality, assignment = clustering_quality(test.centre(cluster_layer), test.labels,
                                                 num_classes, cfg.seed, cfg.kmeans_runs)
        clusters = {"layer": cluster_layer, "split": "test", "num_clusters": num_classes,
                    **quality}
        lap("clustering_s")
    with writer.as_default():
        for key in ("top1", "top5"):
            tf.summary.scalar(f"knn/{key}", knn[key], step=cfg.epochs)
        for key in ("nmi", "ari", "acc"):
            tf.summary.scalar(f"clustering/{key}", clusters[key], step=cfg.epochs)
    writer.close()

    probes = {}
    for layer, history in histories.items():
        best = max(history, key=lambda h: h["top1"])  # the first of equal bests
        kernel, pad = backbone.pools.get(layer, (None, None))
        probes[layer] = {
            "endpoint_shape": list(backbone.shapes[layer]), "dim": backbone.dim(layer),
            "pool_kernel_stride_pad": None if kernel is None else [kernel, kernel, pad],
            "top1_last": history[-1]["top1"], "top5_last": history[-1]["top5"],
            "top1_best": best["top1"], "top5_best": best["top5"], "best_epoch": best["epoch"],
            "history": history}
    timings["total_s"] = time.time() - start
    return {"name": name, "model": backbone.path, "mode": "augment" if cfg.augment else "cached",
            "test_views": "ten_crop" if cfg.ten_crop else "centre_crop",
            "dataset": train_source.name, "test_dataset": test_source.name,
            "num_train": len(train.labels), "num_test": len(test.labels),
            "skipped_images": {"train": train.skipped, "test": test.skipped},
            "num_classes": num_classes, "image_size": backbone.image_size,
            "resize_size": resize_size, "probes": probes, "knn": knn, "clustering": clusters,
            "per_image": per_image_record(test.labels, assignment, {
                **knn_hits, **{f"{kind}:{layer}": hit for layer, kinds in probe_hits.items()
                               for kind, hit in kinds.items()}}),
            "cache": {"memory_bytes": store.memory_bytes, "disk_bytes": store.disk_bytes},
            "timings": timings}


def _open_labelled(dataset: str, data_dir: str, max_examples: int, flag: str):
    source = open_source(dataset, data_dir, max_examples)
    if source.labels is None and (source.random_access or source.label_key is None):
        raise ConfigError(f"--{flag}={dataset} has no labels (a folder needs one sub-folder per "
                          "class, a TFDS dataset a 'label' feature); the evaluation needs them")
    return source


def run(cfg: ProbeConfig) -> dict:
    """Evaluates every model of `cfg`, rewriting the JSON after each; returns the report."""
    cfg = validate(cfg)
    cli.log_config(cfg)
    # Whatever is wrong with the flags fails here, before any feature is computed.
    train_source = _open_labelled(cfg.dataset, cfg.data_dir, cfg.max_examples, "dataset")
    test_source = _open_labelled(cfg.test_dataset, cfg.data_dir, cfg.max_test_examples,
                                 "test_dataset")
    backbones = [ExportedBackbone(path) for path in cfg.models]
    for backbone in backbones:
        _plan(backbone, cfg)

    report = {"program": "eval.linear_probe", "config": dataclasses.asdict(cfg),
              "table_shows": "probe top-1 %, last epoch (best epoch)", "models": []}
    for folder in (os.path.dirname(os.path.abspath(cfg.output)), cfg.cache_dir):
        os.makedirs(folder or ".", exist_ok=True)
    for name, backbone in zip(cfg.names, backbones):
        logging.info("evaluating %s (%s)", name, backbone.path)
        report["models"].append(evaluate_model(backbone, name, train_source, test_source, cfg))
        cli.write_report(cfg.output, report)
    return report


def markdown_table(report: dict) -> str:
    """One row per model: probe top-1 % last (best) per layer, kNN top-1 %, NMI, ARI, ACC %."""
    rows = report["models"]
    layers = list(dict.fromkeys(layer for row in rows for layer in row["probes"]))
    first = rows[0]
    lines = [f"Linear probes {first['dataset']} -> {first['test_dataset']} ({first['mode']}, "
             f"{first['test_views']}): top-1 %, last epoch (best epoch). kNN k={first['knn']['k']}"
             f": top-1 %. k-means k={first['num_classes']} on the test split (the lowest "
             f"objective of {first['clustering'].get('kmeans_runs', 1)} runs): NMI, ARI, ACC %.",
             "", "| model | " + " | ".join(layers) + " | kNN | NMI | ARI | ACC |",
             "|---" * (len(layers) + 5) + "|"]
    for row in rows:
        cells = [f"{100 * p['top1_last']:.1f} ({100 * p['top1_best']:.1f})"
                 if (p := row["probes"].get(layer)) else "-" for layer in layers]
        c = row["clustering"]
        cells += [f"{100 * row['knn']['top1']:.1f} ({row['knn']['layer']})", f"{c['nmi']:.3f}",
                  f"{c['ari']:.3f}", f"{100 * c['acc']:.1f} ({c['layer']})"]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line

def _define_flags() -> None:
    """Defines one flag per ProbeConfig field (here, so importing the module defines none)."""
    cli.define_flags(ProbeConfig, _HELP, skip=("models", "names"), lists=("layers",))
    flags.adopt_module_key_flags(cli)  # listed by --help as this program's
    for name in ("models", "names"):  # --model=A --model=B, one --name per --model
        flags.DEFINE_multi_string(name[:-1], None, _HELP[name])
    flags.mark_flags_as_required(["model", "output"])


def _config_from_flags() -> ProbeConfig:
    f = flags.FLAGS
    return ProbeConfig(models=tuple(f.model), names=tuple(f.name or ()), layers=tuple(f.layers),
                       **cli.flag_values(ProbeConfig, skip=("models", "names", "layers")))


def entry_point():
    cli.run_program(_define_flags, _config_from_flags, run, markdown_table)


if __name__ == "__main__":
    entry_point()
