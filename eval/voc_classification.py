r"""PASCAL VOC 2007 classification of an exported network: fine-tuning (fc6-8, all) or SVMs.

    python -m eval.voc_classification --model=runs/alexnet/export \
        --voc=/data/VOCdevkit/VOC2007 --mode=fc6_8 --output=runs/alexnet/voc_fc6_8.json
    python -m eval.voc_classification --model=runs/alexnet/export --voc=tfds:voc/2007 \
        --data_dir=/data/tfds --mode=all --output=runs/alexnet/voc_all.json
    python -m eval.voc_classification --model=runs/alexnet/export --voc=/data/VOCdevkit \
        --mode=svm --layer=fc7 --output=runs/alexnet/voc_svm.json    # or --mode=lowshot

Train on --train_split (trainval), test on --test_split (test) as docs/protocols.md §4 and
deepcluster's eval_voc_classif.py do, reading the export through its SavedModel alone.

fc6_8 / all: a new head fc6 -> fc7 -> fc8 (ReLU between; Dense N(0, 0.01), bias 0.1; dropout 0.5
where the architecture's classifier has it) on `head_input`: the last conv endpoint of the
`conv_features` signature at the export's size S, max-pooled as the network itself pools before
its fc6 (AlexNet conv5 3/2 -> 6x6x256, VGG16 conv5 2/2 -> 7x7x512, small_vgg conv3 2/2 ->
4x4x128), or ResNet-50's conv5 averaged (2048). Sigmoid cross-entropy over the non-difficult
labels / batch size; gradients clipped to global norm --clip_norm, then SGD with momentum and
coupled weight decay (torch's order); lr halved every --lr_step. Training views: a random square
crop of --min_scale..--max_scale of the area, resized to S, flipped. fc6_8 trains the head; all
also the conv kernels, biases and BN gamma/beta of `backbone_trainable_variables`, starting from
the exported values. BN runs in inference mode in both (exported moving statistics; deepcluster:
`model.features.eval()`). Test: --test_crops random crops (or --test_views=ten_crop), logits
summed; AP per class over the non-difficult images (metrics.voc_average_precision), mAP.

svm / lowshot: a LinearSVC per class on L2-normalised centre-crop features of --layer, its C
chosen by cross-validation (svm), or trained on seeded draws of k positives per class for every
C (lowshot); eval/voc_svm.py has the details.

Every mode stops at once, naming --voc, if not one image of the train or test split decodes.

Writes --output (JSON), TensorBoard scalars under --logdir and a markdown table (stdout).
docs/voc_classification.md has the full protocol settings and how to point --voc at VOC2007.
"""

import dataclasses
import math
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from dc_core import transforms
from dc_core.errors import ConfigError
from eval import cli, metrics, voc, voc_svm
from eval.features import ExportedBackbone, guess_arch, unknown_arch
from eval.voc import ap_dict, image_batches, per_image

MODES = ("fc6_8", "all", "svm", "lowshot")
# Protocol defaults (docs/protocols.md §4; deepcluster's README): mode -> (lr, lr step, iterations).
FINE_TUNING = {"fc6_8": (0.003, 5000, 80000), "all": (0.001, 20000, 150000)}


@dataclasses.dataclass(frozen=True)
class VOCConfig:
    """One run's settings; the fields are the flags. Zeros and empty values mean the protocol's
    value for the mode (filled in by `validate`)."""
    model: str
    voc: str
    output: str
    mode: str = "fc6_8"
    data_dir: str = ""
    train_split: str = "trainval"
    test_split: str = "test"
    iterations: int = 0
    learning_rate: float = 0.0
    lr_step: int = 0
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-6
    clip_norm: float = 10.0
    min_scale: float = 0.1
    max_scale: float = 0.5
    test_views: str = "random"
    test_crops: int = 10
    log_every: int = 100
    layer: str = ""
    costs: tuple = ()
    cv_folds: int = 3
    lowshot_k: tuple = (1, 2, 4, 8, 16, 32, 64, 96)
    lowshot_samples: int = 5
    seed: int = 31
    logdir: str = ""


_HELP = {
    "voc": voc.HELP,
    "mode": "fc6_8 (head only), all (head and backbone), svm or lowshot.",
    "data_dir": "TFDS data dir of --voc=tfds:voc/2007.",
    "train_split": "Image set trained on.",
    "test_split": "Image set tested on.",
    "iterations": "SGD iterations (0 = protocol: fc6_8 80000, all 150000).",
    "learning_rate": "Initial lr (0 = protocol: fc6_8 0.003, all 0.001).",
    "lr_step": "Halve the lr every this many iterations (0 = protocol: 5000 / 20000).",
    "batch_size": "Fine-tuning batch size; also images per feature batch.",
    "momentum": "SGD momentum.",
    "weight_decay": "Coupled L2 coefficient on every trained variable.",
    "clip_norm": "Clip the gradients to this global norm.",
    "min_scale": "Smallest area fraction of a random crop.",
    "max_scale": "Largest area fraction of a random crop.",
    "test_views": "random (--test_crops random crops) or ten_crop.",
    "test_crops": "Random crops per test image.",
    "log_every": "Log the training loss every this many iterations.",
    "layer": "SVM feature endpoint (default fc7, else pool).",
    "costs": "SVM C values (default: 1, 10, 100, 2^-4 ... 2^-19).",
    "cv_folds": "Cross-validation folds choosing C (svm).",
    "lowshot_k": "Positives per class of the low-shot draws.",
    "lowshot_samples": "Draws per k.",
    "seed": "Seed of the head, crops, order, dropout and low-shot draws.",
}


def validate(cfg: VOCConfig) -> VOCConfig:
    """Checks the flags that need no data and fills in the protocol defaults and logdir."""
    cli.require_given(cfg, model="MODEL_DIR/export", voc="PATH", output="FILE.json")
    cli.choice("mode", cfg.mode, MODES)
    if cfg.test_views not in ("random", "ten_crop"):
        raise ConfigError(f"--test_views={cfg.test_views}: choose random or ten_crop")
    if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
        raise ConfigError(f"--min_scale={cfg.min_scale} and --max_scale={cfg.max_scale} must "
                          "satisfy 0 < min_scale <= max_scale <= 1")
    cli.check_each(cfg, ("iterations", "learning_rate", "lr_step"), lambda value: value >= 0,
                   "must be positive (or 0: default)")
    cli.check_each(cfg, ("batch_size", "clip_norm", "test_crops", "log_every", "cv_folds",
                         "lowshot_samples"))
    if cfg.cv_folds < 2:
        raise ConfigError(f"--cv_folds={cfg.cv_folds}: cross-validation needs at least 2")
    costs = tuple(cfg.costs) or voc_svm.PROTOCOL_COSTS
    if min(costs) <= 0 or not cfg.lowshot_k or min(cfg.lowshot_k) <= 0:
        raise ConfigError(f"--costs={','.join(map(str, costs))} and --lowshot_k="
                          f"{','.join(map(str, cfg.lowshot_k))} must be positive numbers")
    lr, step, iterations = FINE_TUNING.get(cfg.mode, (0.0, 0, 0))
    return dataclasses.replace(
        cfg, costs=costs, iterations=cfg.iterations or iterations,
        learning_rate=cfg.learning_rate or lr, lr_step=cfg.lr_step or step,
        logdir=cli.default_logdir(cfg))


# ------------------------------------------------------------------------------ images

def random_crops(size: int, cfg: VOCConfig, count: int):
    """View: `count` random square crops of min..max_scale of the area, resized, flipped.

    Each crop's stateless seed is drawn from TensorFlow's global generator (seeded by --seed).
    """
    def crop(image):
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
        return transforms.random_resized_crop(image, size, (cfg.min_scale, cfg.max_scale),
                                              (1.0, 1.0), seed)
    return lambda image: tf.stack([crop(image) for _ in range(count)])


def ten_crops(size: int):
    """View: the centre and four corners of the image resized (shorter side) to the default
    resize size, and their mirror images (torchvision's Resize + TenCrop)."""
    resize_size = transforms.default_resize_size(size)

    def view(image):
        h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
        scale = resize_size / tf.minimum(h, w)
        new_h = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
        new_w = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
        x = tf.image.resize(image, [new_h, new_w], antialias=True)
        far_h, far_w = new_h - size, new_w - size
        crops = tf.stack([x[t:t + size, l:l + size] for t, l in (
            (far_h // 2, far_w // 2), (0, 0), (0, far_w), (far_h, 0), (far_h, far_w))])
        return tf.concat([crops, tf.reverse(crops, axis=[2])], 0)
    return view


# ------------------------------------------------------------------------------ fine-tuning

@dataclasses.dataclass(frozen=True)
class HeadInput:
    """What the new fc6 reads: `endpoint`, max-pooled with pool_kernel/pool_stride (kernel 0:
    spatial mean), flattened; `dropout_fc6`: dropout before fc6 as in the arch's classifier."""
    arch: str
    endpoint: str
    pool_kernel: int
    pool_stride: int
    dropout_fc6: bool
    units: int


# Per architecture: (the conv endpoint its fc6 reads, the max-pool kernel and stride before its
# fc6, dropout before fc6).
_HEAD_INPUTS = {"alexnet": ("conv5", 3, 2, True),
                "vgg16": ("conv5", 2, 2, False),
                "small_vgg": ("conv3", 2, 2, True),
                "resnet50": ("conv5", 0, 0, True)}


def head_input(shapes: dict, arch: Optional[str] = None) -> HeadInput:
    """The classifier input of an export with endpoint shapes `shapes` ({name: shape w/o batch})
    and architecture `arch` (ExportedBackbone.architecture; None: the one the shapes look like).
    """
    arch = arch or guess_arch(shapes)
    if arch not in _HEAD_INPUTS:
        raise unknown_arch("the classifier input of", shapes, arch)
    endpoint, kernel, stride, dropout = _HEAD_INPUTS[arch]
    if endpoint not in shapes:
        raise unknown_arch("the classifier input of", shapes, arch, (endpoint,))
    units = shapes["fc6"][0] if "fc6" in shapes else 4096
    return HeadInput(arch, endpoint, kernel, stride, dropout, units)


class FineTuner(tf.Module):
    """The export's conv_features signature, pooled, under a new fc6-fc7-fc8 head."""

    def __init__(self, module, plan: HeadInput, size: int, channels: int, cfg: VOCConfig):
        super().__init__()
        self.conv, self.plan, self._cfg = module.signatures["conv_features"], plan, cfg
        init = [keras.initializers.RandomNormal(0.0, 0.01, seed=cfg.seed + i) for i in range(3)]
        dense = dict(bias_initializer=keras.initializers.Constant(0.1))
        self.head = keras.Sequential(
            ([keras.layers.Dropout(0.5, seed=cfg.seed + 3)] if plan.dropout_fc6 else []) + [
                keras.layers.Dense(plan.units, "relu", kernel_initializer=init[0], **dense),
                keras.layers.Dropout(0.5, seed=cfg.seed + 4),
                keras.layers.Dense(plan.units, "relu", kernel_initializer=init[1], **dense),
                keras.layers.Dense(len(voc.CLASSES), kernel_initializer=init[2], **dense)])
        # The backbone variables the head input depends on (not the export's own fc6/fc7).
        variables = list(module.backbone_trainable_variables)
        with tf.GradientTape() as tape:
            x = self.features(tf.zeros([1, size, size, channels], tf.uint8))
        grads = tape.gradient(x, variables)
        self.convs = [v for v, g in zip(variables, grads) if g is not None]
        self._initial = [v.numpy() for v in self.convs]
        self.head.build((None, x.shape[1]))
        self.dim = int(x.shape[1])
        self.params = self.head.trainable_variables + (self.convs if cfg.mode == "all" else [])
        self._velocity = [tf.Variable(tf.zeros_like(p), trainable=False) for p in self.params]
        self.step = tf.Variable(0, dtype=tf.int64)

    def features(self, images):
        """uint8 [B, S, S, C] -> float32 [B, dim], the head's input."""
        x = self.conv(images=images)[self.plan.endpoint]
        if self.plan.pool_kernel:
            x = tf.nn.max_pool2d(x, self.plan.pool_kernel, self.plan.pool_stride, "VALID")
        else:
            x = tf.reduce_mean(x, axis=[1, 2])
        return tf.reshape(x, [tf.shape(x)[0], -1])

    def logits(self, images, training: bool = False):
        """uint8 [B, S, S, C] -> float32 [B, 20]."""
        x = self.features(images)
        return self.head(x if self._cfg.mode == "all" else tf.stop_gradient(x), training=training)

    @tf.function
    def train_step(self, images, labels):
        """One SGD step on uint8 images and int8 [B, 20] labels; returns (loss, lr)."""
        cfg = self._cfg
        lr = cfg.learning_rate * 0.5 ** tf.cast(self.step // cfg.lr_step, tf.float32)
        with tf.GradientTape() as tape:
            loss = tf.nn.sigmoid_cross_entropy_with_logits(
                tf.cast(labels == voc.PRESENT, tf.float32), self.logits(images, training=True))
            keep = tf.cast(labels != voc.DIFFICULT, tf.float32)
            loss = tf.reduce_sum(loss * keep) / tf.cast(tf.shape(labels)[0], tf.float32)
        grads, _ = tf.clip_by_global_norm(tape.gradient(loss, self.params), cfg.clip_norm)
        for param, grad, velocity in zip(self.params, grads, self._velocity):
            velocity.assign(cfg.momentum * velocity + grad + cfg.weight_decay * param)
            param.assign_sub(lr * velocity)
        self.step.assign_add(1)
        return loss, lr

    def backbone_change(self) -> float:
        """||w - w0|| / ||w0|| over the conv variables (0 when they were frozen)."""
        diff = sum(float(np.sum((v.numpy() - w) ** 2)) for v, w in zip(self.convs, self._initial))
        return math.sqrt(diff / sum(float(np.sum(w ** 2)) for w in self._initial))


def fine_tune(path: str, train: voc.VOCSplit, test: voc.VOCSplit, cfg: VOCConfig,
              writer) -> tuple:
    """Trains the head (and for `all` the backbone); returns (test scores [N, 20], record)."""
    backbone = ExportedBackbone(path)
    size, channels = backbone.image_size, backbone.channels
    plan = head_input(backbone.shapes, backbone.architecture("the classifier input"))
    del backbone  # the fine-tuner loads its own copy of the weights
    module = tf.saved_model.load(path)
    if "conv_features" not in module.signatures:
        raise ConfigError(f"--model={path} has no conv_features signature; export it again "
                          "with the current dc_tf")
    tuner = FineTuner(module, plan, size, channels, cfg)
    labels = train.labels()
    batches = iter(image_batches(train, channels, random_crops(size, cfg, 1), cfg.batch_size,
                                 shuffle=True, seed=cfg.seed, repeat=True))
    start, losses = time.time(), []
    for it in range(1, cfg.iterations + 1):
        indices, images = next(batches)
        loss, lr = tuner.train_step(images[:, 0], tf.constant(labels[indices.numpy()]))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise ConfigError(f"the VOC loss became {losses[-1]} at iteration {it}; lower "
                              f"--learning_rate (now {cfg.learning_rate})")
        if it % cfg.log_every == 0 or it == cfg.iterations:
            mean = float(np.mean(losses[-cfg.log_every:]))
            with writer.as_default():
                tf.summary.scalar("train/loss", mean, step=it)
                tf.summary.scalar("train/learning_rate", float(lr), step=it)
            logging.info("iteration %d/%d: loss %.4f, lr %.2e (%.1f it/s)", it, cfg.iterations,
                         mean, float(lr), it / (time.time() - start))
    train_s = time.time() - start
    views = (random_crops(size, cfg, cfg.test_crops) if cfg.test_views == "random"
             else ten_crops(size))
    logits = tf.function(lambda images: tf.reduce_sum(tf.reshape(
        tuner.logits(tf.reshape(images, [-1, size, size, channels])),
        [tf.shape(images)[0], -1, len(voc.CLASSES)]), axis=1))
    scores = per_image(test, image_batches(test, channels, views, max(1, 64 // cfg.test_crops)),
                       lambda images: logits(images).numpy(), f"test views of {test.name}")
    return scores, {
        "head": dataclasses.asdict(plan) | {"input_dim": tuner.dim},
        "trained_values": int(sum(np.prod(p.shape) for p in tuner.params)),
        "backbone_relative_change": tuner.backbone_change(), "iterations": cfg.iterations,
        "final_loss": float(np.mean(losses[-cfg.log_every:])),
        "image_size": size, "train_s": train_s}


# ------------------------------------------------------------------------------ the run

def _require_decodable(split: voc.VOCSplit, cfg: VOCConfig, flag: str) -> None:
    """Fails unless some image of `split` decodes: the repeated training stream would otherwise
    wait forever for one, and the test split is read only once training is over."""
    # Any channel count: voc.decode decodes as RGB whatever the export reads.
    decoded = split.records().map(lambda _, encoded: voc.decode(encoded, 3)).ignore_errors()
    if next(iter(decoded.take(1)), None) is None:
        first = f" (the first: {split.images[0].path})" if split.images[0].path else ""
        raise ConfigError(
            f"--voc={cfg.voc}: none of the {len(split.images)} images of --{flag}="
            f"{getattr(cfg, flag)} decodes as an image{first}; restore the JPEGs from the "
            "VOC2007 tars (or rebuild the TFDS dataset) and run again")


def run(cfg: VOCConfig) -> dict:
    """Evaluates the export as `cfg` says and writes the JSON; returns the report."""
    cfg = validate(cfg)
    cli.log_config(cfg)
    tf.random.set_seed(cfg.seed)
    start = time.time()
    train = voc.open_split(cfg.voc, cfg.train_split, cfg.data_dir)
    test = voc.open_split(cfg.voc, cfg.test_split, cfg.data_dir)
    _require_decodable(train, cfg, "train_split")
    _require_decodable(test, cfg, "test_split")
    if cfg.mode not in FINE_TUNING:
        voc_svm.check_positives(train, cfg)
    report = {"program": "eval.voc_classification", "config": dataclasses.asdict(cfg),
              "mode": cfg.mode, "model": cfg.model, "train": train.name, "test": test.name,
              "num_train": len(train.images), "num_test": len(test.images),
              "missing_images": {"train": len(train.missing), "test": len(test.missing)}}
    os.makedirs(cfg.logdir, exist_ok=True)
    writer = tf.summary.create_file_writer(cfg.logdir)
    test_labels = test.labels()
    if cfg.mode in FINE_TUNING:
        scores, record = fine_tune(cfg.model, train, test, cfg, writer)
    else:
        scores, record = voc_svm.svm_evaluation(cfg, train, test, writer)
    report.update(record)
    if scores is not None:
        seen = ~np.isnan(scores[:, 0])
        aps, mean_ap = metrics.voc_mean_average_precision(scores[seen], test_labels[seen])
        report.update(ap=ap_dict(aps), map=mean_ap, undecodable_test_images=int((~seen).sum()))
        with writer.as_default():
            for name, ap in report["ap"].items():
                if ap is not None:
                    tf.summary.scalar(f"ap/{name}", ap, step=cfg.iterations)
            tf.summary.scalar("map", mean_ap, step=cfg.iterations)
    writer.close()
    report["total_s"] = time.time() - start
    cli.write_report(cfg.output, report)
    return report


def markdown_table(report: dict) -> str:
    """Per-class AP % and mAP, or for lowshot the mAP % per k."""
    title = f"VOC07 {report['mode']}: {report['model']} ({report['train']} -> {report['test']})"
    if report["mode"] == "lowshot":
        return voc_svm.lowshot_table(report, title)
    return voc.ap_table(title + ", AP %", report["ap"], report["map"])


# ------------------------------------------------------------------------------ command line

def _define_flags() -> None:
    """Defines one flag per VOCConfig field (here, so importing the module defines none)."""
    cli.define_flags(VOCConfig, _HELP, lists=("costs", "lowshot_k"),
                     required=("model", "voc", "output"))
    flags.adopt_module_key_flags(cli)  # listed by --help as this program's


def _config_from_flags() -> VOCConfig:
    return VOCConfig(**cli.parse_lists(cli.flag_values(VOCConfig),
                                       {"costs": float, "lowshot_k": int}))


def entry_point():
    cli.run_program(_define_flags, _config_from_flags, run, markdown_table)


if __name__ == "__main__":
    entry_point()
