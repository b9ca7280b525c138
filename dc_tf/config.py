"""The resolved configuration of a DeepCluster run: a frozen dataclass and its checks.

No TensorFlow and no absl here: `train_flags.config_from_flags()` builds a `TrainConfig` once in
`main`, `validate()` rejects bad values before any work starts, and library code only ever reads
the frozen object. Field names equal flag names.
"""

import dataclasses
import json
import math
import os
import tempfile
from typing import Optional

from dc_core.clustering.kmeans import KMEANS_MODES
from dc_core.errors import ConfigError

# DeepCluster (Caron et al. 2018) or its successor DeepCluster-v2 (docs/protocols.md §9).
METHODS = ("deepcluster", "deepcluster_v2")
ARCHS = ("alexnet", "vgg16", "resnet50", "small_vgg")
CLUSTERINGS = ("kmeans", "pic")
# "default": one device; "mirrored": tf.distribute.MirroredStrategy over the local devices;
# "multi_worker": MultiWorkerMirroredStrategy, the cluster read from TF_CONFIG.
STRATEGIES = ("default", "mirrored", "multi_worker")
# Image sides above this would ask for gigabytes per batch before any useful work.
MAX_IMAGE_SIZE = 2048
# Seeds reach FAISS as a C int (k-means of epoch t uses seed + t) and Keras as a 32-bit value.
MAX_SEED = 2**31 - 1
# What may differ between a model_dir's run and the command resuming it (the folder's own path
# may be spelled differently: relative, absolute, through a link).
RESUMABLE_CHANGES = ("epochs", "learning_rate", "model_dir", "jit_compile", "mixed_precision",
                     "strategy")
# Flags that mean something for one method only; giving one with the other method is refused.
METHOD_FLAGS = {
    "deepcluster": ("num_clusters", "clustering", "pca_dim", "pca_sample", "kmeans_mode",
                    "reassign", "crop_scale", "supervised"),
    "deepcluster_v2": ("num_prototypes", "projection_dims", "temperature", "global_crops",
                       "global_crop_scale",
                       "local_crops", "local_crop_size", "local_crop_scale", "warmup_epochs",
                       "final_learning_rate", "lars", "lars_trust_coefficient", "color_jitter",
                       "blur", "feature_spread"),
}


AUTO_CLUSTERS = 0  # --num_clusters=0: auto_num_clusters of the dataset's images


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; the defaults are the paper's (flags/base.cfg)."""

    method: str = "deepcluster"
    # Data.
    dataset: str = "fashion_mnist"
    data_dir: str = ""
    max_examples: int = 0
    # Network and input.
    arch: str = "alexnet"
    sobel: bool = True
    image_size: int = 224
    resize_size: int = 256
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (0.75, 4.0 / 3.0)
    # Clustering.
    num_clusters: int = 10000  # AUTO_CLUSTERS: from the number of images
    clustering: str = "kmeans"
    pca_dim: int = 256
    pca_sample: int = 50000
    kmeans_iters: int = 20
    kmeans_mode: str = "exact"
    # DeepCluster-v2: projection head (hidden, output), prototype heads (one k each), softmax
    # temperature, multi-crop (global_crops >= 2 crops, the first two written to the memory bank;
    # local_crops smaller ones); ImageNet values.
    num_prototypes: tuple = (3000, 3000, 3000)
    projection_dims: tuple = (2048, 128)
    temperature: float = 0.1
    global_crops: int = 2
    global_crop_scale: tuple = (0.14, 1.0)
    local_crops: int = 6
    local_crop_size: int = 96
    local_crop_scale: tuple = (0.05, 0.14)
    # Colour distortion strength of every crop (0: none) and Gaussian blur with p = 0.5.
    color_jitter: float = 1.0
    blur: bool = True
    # dc_tf's addition to DeepCluster-v2 (0: the published objective): the weight of a term
    # that spreads the last convolutions, fc6 and fc7 over more directions (model.spread_penalty).
    feature_spread: float = 0.0
    # Optimisation.
    epochs: int = 500
    batch_size: int = 256
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    reassign: int = 1
    # DeepCluster-v2's schedule and optimiser: a linear warm-up from 0 over warmup_epochs, then a
    # cosine from learning_rate down to final_learning_rate (None: the rate stays constant);
    # LARC (layer-wise trust ratio, unclipped) around SGD.
    warmup_epochs: int = 0
    final_learning_rate: float | None = None
    lars: bool = False
    lars_trust_coefficient: float = 0.001
    seed: int = 31
    # Baselines: train on the ground-truth labels instead of clusters (the Supervised row).
    supervised: bool = False
    # Speed only: compile the training step with XLA; compute in bfloat16 (float32 variables);
    # spread training and the feature pass over devices or workers.
    jit_compile: bool = False
    mixed_precision: bool = False
    strategy: str = "default"
    # Output.
    model_dir: str = ""
    # Filled in by train.main() once the dataset is open; not flags.
    channels: int = 0
    num_examples: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def describe(self) -> tuple:
        """(the method in words, its clusters in words) for the console and the report."""
        if self.method == "deepcluster_v2":
            return "DeepCluster-v2", f"{'/'.join(map(str, self.num_prototypes))} prototypes"
        return ("supervised baseline" if self.supervised else "DeepCluster",
                f"k = {self.num_clusters}")

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        fields = json.loads(text)
        for name in ("mean", "std", "crop_scale", "crop_ratio", "num_prototypes",
                     "projection_dims", "global_crop_scale", "local_crop_scale"):
            if name in fields:  # a run folder of an older dc_tf lacks the v2 fields
                fields[name] = tuple(fields[name])
        return cls(**fields)


def _fail(flag: str, value, why: str) -> None:
    raise ConfigError(f"--{flag}={value}: {why}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Rejects values no run could use, naming the flag and the fix. Returns cfg unchanged."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            _fail(field.name, ",".join(map(str, values)), "must be a finite number")
    if not 0 <= cfg.seed <= MAX_SEED - cfg.epochs - 1:
        _fail("seed", cfg.seed, f"needs 0 <= seed < {MAX_SEED - cfg.epochs} (2**31 - 1 - "
              f"--epochs={cfg.epochs}): the k-means seeds of the epochs count up from it")
    for name in ("image_size", "resize_size", "local_crop_size"):
        if getattr(cfg, name) > MAX_IMAGE_SIZE:
            _fail(name, getattr(cfg, name), f"above {MAX_IMAGE_SIZE} px; lower it")
    if cfg.method not in METHODS:
        _fail("method", cfg.method, f"choose one of {', '.join(METHODS)}")
    if cfg.arch not in ARCHS:
        _fail("arch", cfg.arch, f"unknown architecture; choose one of {', '.join(ARCHS)}")
    if cfg.clustering not in CLUSTERINGS:
        _fail("clustering", cfg.clustering, f"choose one of {', '.join(CLUSTERINGS)}")
    if cfg.kmeans_mode not in KMEANS_MODES:
        _fail("kmeans_mode", cfg.kmeans_mode, f"choose one of {', '.join(KMEANS_MODES)}")
    if cfg.strategy not in STRATEGIES:
        _fail("strategy", cfg.strategy, f"choose one of {', '.join(STRATEGIES)}")
    if cfg.epochs < 0:
        _fail("epochs", cfg.epochs, "must be >= 0 (0 exports the untrained network)")
    for name in ("batch_size", "reassign", "image_size", "kmeans_iters"):
        if getattr(cfg, name) < 1:
            _fail(name, getattr(cfg, name), "must be a positive integer")
    if cfg.num_clusters < 2 and cfg.num_clusters != AUTO_CLUSTERS:
        _fail("num_clusters", cfg.num_clusters, "DeepCluster needs at least 2 clusters (0: "
              "chosen from the number of images)")
    for name in ("max_examples", "pca_dim"):
        if getattr(cfg, name) < 0:
            _fail(name, getattr(cfg, name), "must be >= 0 (0 means: all / no PCA)")
    if cfg.pca_dim and cfg.pca_sample < cfg.pca_dim:
        _fail("pca_sample", cfg.pca_sample, f"PCA needs at least --pca_dim={cfg.pca_dim} samples")
    if not cfg.learning_rate > 0:
        _fail("learning_rate", cfg.learning_rate, "must be > 0 (paper: 0.05)")
    if not 0 <= cfg.momentum < 1:
        _fail("momentum", cfg.momentum, "must be in [0, 1) (paper: 0.9)")
    if not cfg.weight_decay >= 0:
        _fail("weight_decay", cfg.weight_decay, "must be >= 0 (paper: 1e-5)")
    if cfg.resize_size < cfg.image_size:
        _fail("resize_size", cfg.resize_size, f"must be >= --image_size={cfg.image_size}")
    lo, hi = cfg.crop_scale
    if not 0 < lo <= hi <= 1:
        _fail("crop_scale", f"{lo},{hi}", "needs 0 < min <= max <= 1 (paper: 0.08,1)")
    lo, hi = cfg.crop_ratio
    if not 0 < lo <= hi:
        _fail("crop_ratio", f"{lo},{hi}", "needs 0 < min <= max (paper: 0.75,1.3333)")
    if any(s <= 0 for s in cfg.std):
        _fail("std", ",".join(map(str, cfg.std)), "every standard deviation must be > 0")
    if len(cfg.mean) != len(cfg.std):
        _fail("mean", ",".join(map(str, cfg.mean)),
              f"give as many values as --std ({len(cfg.std)})")
    if not cfg.model_dir:
        _fail("model_dir", '""', "name an output folder (re-using it resumes the run)")
    if cfg.method == "deepcluster_v2":
        _validate_v2(cfg)
    return cfg


def _validate_v2(cfg: TrainConfig) -> None:
    if cfg.epochs == 0:
        _fail("epochs", 0, "DeepCluster-v2's prototypes come from its first epoch; for the "
              "untrained network (the Random baseline) use --method=deepcluster --epochs=0")
    if not cfg.num_prototypes or min(cfg.num_prototypes) < 2:
        _fail("num_prototypes", ",".join(map(str, cfg.num_prototypes)),
              "give one k >= 2 per prototype head (ImageNet: 3000,3000,3000)")
    if len(cfg.projection_dims) != 2 or min(cfg.projection_dims) < 1:
        _fail("projection_dims", ",".join(map(str, cfg.projection_dims)),
              "give the hidden and output widths of the projection head (ResNet-50: 2048,128)")
    if not cfg.temperature > 0:
        _fail("temperature", cfg.temperature, "must be > 0 (DeepCluster-v2: 0.1)")
    if cfg.global_crops < 2:
        _fail("global_crops", cfg.global_crops, "needs at least 2: the memory bank holds the "
              "embeddings of the first two (DeepCluster-v2: 2)")
    if cfg.local_crops < 0:
        _fail("local_crops", cfg.local_crops, "must be >= 0")
    if cfg.local_crop_size < 1:
        _fail("local_crop_size", cfg.local_crop_size, "must be a positive integer")
    for name in ("global_crop_scale", "local_crop_scale"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            _fail(name, f"{lo},{hi}", "needs 0 < min <= max <= 1")
    if cfg.local_crops and cfg.arch != "resnet50" and cfg.local_crop_size != cfg.image_size:
        _fail("local_crop_size", cfg.local_crop_size, f"--arch={cfg.arch} ends in fully "
              f"connected layers that take --image_size={cfg.image_size} inputs: set "
              f"--local_crop_size={cfg.image_size} (a small region, resized) or --local_crops=0")
    if not 0 <= cfg.color_jitter <= 1.25:
        _fail("color_jitter", cfg.color_jitter, "needs 0 <= strength <= 1.25 (factors drawn from "
              "1 -/+ 0.8 x strength must stay >= 0; DeepCluster-v2: 1, 0 = off)")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        _fail("warmup_epochs", cfg.warmup_epochs, f"needs 0 <= warm-up < --epochs={cfg.epochs}")
    if cfg.final_learning_rate is not None and not (
            0 <= cfg.final_learning_rate <= cfg.learning_rate):
        _fail("final_learning_rate", cfg.final_learning_rate,
              f"needs 0 <= final rate <= --learning_rate={cfg.learning_rate} (DeepCluster-v2: "
              "a thousandth of it); leave it out for a constant rate")
    if not 0 <= cfg.feature_spread <= 1:
        _fail("feature_spread", cfg.feature_spread, "needs 0 <= weight <= 1 (0: the published "
              "DeepCluster-v2 objective; the Fashion-MNIST default: 0.1)")
    if not 0 < cfg.lars_trust_coefficient < 1:
        _fail("lars_trust_coefficient", cfg.lars_trust_coefficient,
              "needs 0 < trust < 1 (DeepCluster-v2: 0.001)")


def check_model_dir(model_dir: str) -> None:
    """Refuses a --model_dir that is not a folder or cannot be created or written, before any
    data is read. Creates nothing: it writes (and removes) a scratch folder in model_dir, or in
    the nearest existing folder above it that a run would create model_dir in."""
    path = os.path.abspath(model_dir)
    existing = path
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            _fail("model_dir", model_dir, f"{existing} is a file, not a folder; choose another "
                  "--model_dir")
        existing = os.path.dirname(existing)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dc_tf_write_test_", dir=existing))
    except OSError as e:
        _fail("model_dir", model_dir, f"cannot {'write in' if existing == path else 'create'} "
              f"it ({e.strerror} in {existing}); choose a writable --model_dir")


def check_against_data(cfg: TrainConfig, feature_dim: Optional[int],
                       readable: Optional[int] = None) -> None:
    """Checks what depends on the opened dataset and the built network, before any work, and
    again once the first pass over the data has found how many images decode (`readable`; the
    clustering feature's width `feature_dim` is then already checked: None). Every problem
    found goes into one message."""
    n = cfg.num_examples if readable is None else readable
    images = f"the {n} {'' if readable is None else 'readable '}images of --dataset={cfg.dataset}"
    problems = []

    def problem(flag: str, value, why: str):
        problems.append(f"--{flag}={value}: {why}")

    if cfg.batch_size > n:
        problem("batch_size", cfg.batch_size, f"exceeds {images}; use at most {n}")
    if cfg.method == "deepcluster_v2":
        if max(cfg.num_prototypes) > n:
            problem("num_prototypes", ",".join(map(str, cfg.num_prototypes)),
                    f"a head has more prototypes than {images}; use at most {n} per head")
    else:
        if cfg.num_clusters > n:
            problem("num_clusters", cfg.num_clusters,
                    f"exceeds {images}; use at most {n}, or 0 to have it chosen from the number "
                    f"of images ({auto_num_clusters(n)} here; over-clustering, about 10x the "
                    "number of classes, is the usual advice)")
        if feature_dim is not None and cfg.pca_dim > feature_dim:
            problem("pca_dim", cfg.pca_dim, f"exceeds the {feature_dim}-d clustering feature of "
                    f"--arch={cfg.arch}; use at most {feature_dim}, or 0 for no PCA")
        elif cfg.pca_dim > min(n, cfg.pca_sample):
            problem("pca_dim", cfg.pca_dim, "PCA needs at least as many images as dimensions "
                    f"but only {min(n, cfg.pca_sample)} are sampled; use at most "
                    f"{min(n, cfg.pca_sample)} (or 0 for no PCA), or add data")
    if problems:
        raise ConfigError("; ".join(problems))


def check_resumable(saved: TrainConfig, cfg: TrainConfig) -> None:
    """A model_dir resumes only the run it holds.

    --epochs may change (to extend a run) and --learning_rate too (to resume a diverged run from
    its last good checkpoint); anything else would silently mix two experiments.
    """
    diff = [f.name for f in dataclasses.fields(cfg) if f.name not in RESUMABLE_CHANGES
            and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        details = "; ".join(f"--{d}: {getattr(saved, d)!r} there, {getattr(cfg, d)!r} now"
                            for d in diff)
        raise ConfigError(f"--model_dir={cfg.model_dir} holds a run with another configuration "
                          f"({details}); use a new --model_dir, the same flags to resume, or "
                          "--overwrite to delete the old run")


def auto_num_clusters(num_examples: int) -> int:
    """k for --num_clusters=0: one cluster per 40 images, between 2 and 100. bench/RESULTS.md §4
    (Fashion-MNIST, 10 classes) found NMI with the labels highest at 30 to 100 clusters and
    lowest below about 40 images per cluster, where FAISS also warns."""
    return max(2, min(100, num_examples // 40))


def with_data(cfg: TrainConfig, channels: int, num_examples: int, **fields) -> TrainConfig:
    """The configuration completed with what the opened dataset says (and --num_clusters=0
    resolved to auto_num_clusters of its images)."""
    if cfg.num_clusters == AUTO_CLUSTERS and "num_clusters" not in fields:
        fields["num_clusters"] = auto_num_clusters(num_examples)
    return dataclasses.replace(cfg, channels=channels, num_examples=num_examples, **fields)

