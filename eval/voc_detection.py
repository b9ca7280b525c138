r"""PASCAL VOC 2007 object detection with an exported network as the detector's backbone.

    python -m eval.voc_detection --model=runs/alexnet/export --voc=/data/VOCdevkit/VOC2007 \
        --mode=all --output=runs/alexnet/voc_detection_all.json
    python -m eval.voc_detection --model=runs/resnet50/export --voc=/data/VOCdevkit \
        --voc2012=/data/VOCdevkit/VOC2012 --mode=frozen --output=runs/resnet50/det07+12.json
    python -m eval.voc_detection --model=runs/vgg16/export --voc=tfds:voc/2007 \
        --data_dir=/data/tfds --output=runs/vgg16/voc_detection.json

Trains on --train_split (trainval; with --voc2012 also VOC2012's, the 07+12 setting) and tests
on VOC07 --test_split (test), reading the export through its SavedModel alone.

Detector: KerasHub's RetinaNet (keras-hub 0.32; eval/detection_model.py) with the export's
`conv_features` as its image encoder, P3-P5 taken from the architecture's conv endpoints. The
paper used Fast R-CNN (selective-search proposals, RoI pooling, the network's own fc6-fc7 as
the box head) and the benchmark suites Faster R-CNN C4; neither installs here (KerasHub 0.32
has no Faster R-CNN; the Model Garden's tf-models-official needs another TensorFlow). So: a
one-stage detector, an FPN and new conv heads (GroupNorm after each conv, --head_norm)
instead of fc6-fc7, focal loss. Its mAP is therefore not the paper's Table's number, but it
ranks backbones on the same data and metric.
Modes: `frozen` trains only the FPN and the heads, the backbone as exported (the paper's
"fc6-8" spirit: the pretrained convs stay fixed); `all` also trains the conv kernels, biases
and BN gamma/beta (BN statistics fixed, as in detectron2's frozen BN). Images are the export's
own channels (grey exports see grey VOC).

Schedule (docs/protocols.md §5): SGD momentum 0.9, batch 16, 24k iterations, lr x0.1 at 18k and 22k,
linear warm-up over the first 1000 from lr/1000 (detectron2), coupled weight decay 1e-4 on all
trained weights, gradients clipped to global norm 35 (mmdetection's RetinaNet), shorter side
drawn from 480, 512, ..., 800 per batch (longer side <= 1333), horizontal flip with p 0.5;
test at shorter side 800 (eval/detection_data.py). The lr is 0.01, RetinaNet's at batch 16
(Lin et al. 2017; detectron2), not Faster R-CNN's 0.02. Inference (detectron2's RetinaNet):
score >= 0.05, the 5000 best anchors, per-class NMS at IoU 0.5, 100 detections per image.

Metric: VOC07 AP@0.5, 11-point, difficult objects ignored, per class and mean
(metrics.voc_detection_map); --interpolation=area gives the VOC2010+ area variant. Writes
--output (JSON: per-class AP, mAP, mode, iterations, timing), TensorBoard scalars under
--logdir (losses, lr, AP) and prints a markdown table. docs/voc_detection.md has the runs.
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from dc_core.errors import ConfigError
from eval import detection_data as data
from eval import cli, metrics, voc
from eval.detection_model import build_detector, pyramid_plan
from eval.features import ExportedBackbone, Progress

MODES = ("frozen", "all")
WARMUP_FACTOR, LR_DECAY = 0.001, 0.1


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """One run's settings; the fields are the flags."""
    model: str
    voc: str
    output: str
    mode: str = "all"
    voc2012: str = ""
    data_dir: str = ""
    train_split: str = "trainval"
    test_split: str = "test"
    iterations: int = 24000
    learning_rate: float = 0.01
    lr_steps: tuple = (18000, 22000)
    warmup_iterations: int = 1000
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_norm: float = 35.0
    train_sizes: tuple = tuple(range(480, 801, 32))
    test_size: int = 800
    max_size: int = 1333
    head_convs: int = 4
    head_norm: bool = True
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    interpolation: str = "11point"
    log_every: int = 20
    seed: int = 31
    logdir: str = ""


_HELP = {
    "voc": voc.HELP,
    "mode": "frozen (FPN and heads train) or all (the backbone too).",
    "voc2012": "Also train on this VOC2012 folder (VOCdevkit/VOC2012) or tfds:voc/2012: 07+12.",
    "data_dir": "TFDS data dir of tfds: datasets.",
    "train_split": "Image set trained on (of VOC07 and --voc2012).",
    "test_split": "VOC07 image set tested on.",
    "iterations": "SGD iterations (0: evaluate the untrained detector).",
    "learning_rate": "Base learning rate.",
    "lr_steps": "Iterations after which the lr is multiplied by 0.1.",
    "warmup_iterations": "Linear warm-up from lr/1000 over this many iterations.",
    "batch_size": "Images per batch (training and test).",
    "momentum": "SGD momentum.",
    "weight_decay": "Coupled L2 coefficient on every trained variable.",
    "clip_norm": "Clip the gradients to this global norm (0: no clipping).",
    "train_sizes": "Shorter sides drawn per training batch, pixels.",
    "test_size": "Shorter side at test, pixels.",
    "max_size": "Longest side allowed, pixels.",
    "head_convs": "3x3 conv layers in the class and box heads (RetinaNet: 4).",
    "head_norm": "GroupNorm after each head conv (torchvision's RetinaNet v2).",
    "score_threshold": "Lowest class score a detection keeps.",
    "nms_iou": "IoU above which NMS suppresses a box of the same class.",
    "max_detections": "Detections kept per image.",
    "interpolation": "AP: 11point (VOC2007) or area (VOC2010+).",
    "log_every": "Log the training losses every this many iterations.",
    "seed": "Seed of the heads, the order, sizes and flips.",
}


def validate(cfg: DetectionConfig) -> DetectionConfig:
    """Checks the flags that need no data and fills in logdir."""
    cli.require_given(cfg, model="MODEL_DIR/export", voc="PATH", output="FILE.json")
    cli.choice("mode", cfg.mode, MODES)
    if cfg.interpolation not in ("11point", "area"):
        raise ConfigError(f"--interpolation={cfg.interpolation}: choose 11point or area")
    cli.check_each(cfg, ("iterations", "warmup_iterations", "head_convs", "clip_norm"),
                   lambda value: value >= 0, "must be 0 or more")
    cli.check_each(cfg, ("learning_rate", "batch_size", "test_size", "max_size",
                         "max_detections", "log_every"))
    cli.check_each(cfg, ("score_threshold", "nms_iou"), lambda value: 0 <= value <= 1,
                   "must lie in [0, 1]")
    if not cfg.lr_steps or min(cfg.lr_steps) <= 0:
        raise ConfigError(f"--lr_steps={','.join(map(str, cfg.lr_steps))} must be positive "
                          "iteration numbers (past --iterations: no decay)")
    sizes = cfg.train_sizes + (cfg.test_size,)
    if min(sizes) < data.MULTIPLE or max(sizes) > cfg.max_size:
        raise ConfigError(f"--train_sizes={','.join(map(str, cfg.train_sizes))} and "
                          f"--test_size={cfg.test_size} must lie in [{data.MULTIPLE}, "
                          f"--max_size={cfg.max_size}]")
    return dataclasses.replace(cfg, logdir=cli.default_logdir(cfg))


# ------------------------------------------------------------------------------ training

class Trainer(tf.Module):
    """SGD with momentum and coupled weight decay (torch's order) on the detector's weights
    and, in `all` mode, the backbone's, gradients clipped to a global norm; warm-up then step
    decay of the lr."""

    def __init__(self, detector, backbone_variables: list, cfg: DetectionConfig):
        super().__init__()
        self.detector, self._cfg = detector, cfg
        self.backbone = backbone_variables
        self._initial = [v.numpy() for v in backbone_variables]
        self.params = list(detector.trainable_variables) + backbone_variables
        self._velocity = [tf.Variable(tf.zeros_like(p), trainable=False) for p in self.params]
        self.step = tf.Variable(0, dtype=tf.int64)
        self.train_step = tf.function(self._train_step)
        self.predict = tf.function(self._predict)

    def learning_rate(self, step):
        cfg = self._cfg
        step = tf.cast(step, tf.float32)
        decays = tf.add_n([tf.cast(step >= s, tf.float32) for s in cfg.lr_steps] + [0.0])
        warm = tf.minimum(1.0, step / cfg.warmup_iterations) if cfg.warmup_iterations else 1.0
        return cfg.learning_rate * (WARMUP_FACTOR * (1 - warm) + warm) * LR_DECAY ** decays

    def _train_step(self, images, boxes, labels):
        """One step on uint8 [B, H, W, C] canvases and their boxes and classes; returns
        (loss, lr)."""
        cfg, x = self._cfg, tf.cast(images, tf.float32)
        lr = self.learning_rate(self.step)
        with tf.GradientTape() as tape:
            loss = self.detector.compute_loss(
                x=x, y={"boxes": boxes, "labels": labels},
                y_pred=self.detector(x, training=True), sample_weight=None)
        grads = tape.gradient(loss, self.params)
        if cfg.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, cfg.clip_norm)
        for param, grad, velocity in zip(self.params, grads, self._velocity):
            velocity.assign(cfg.momentum * velocity + grad + cfg.weight_decay * param)
            param.assign_sub(lr * velocity)
        self.step.assign_add(1)
        return loss, lr

    def _predict(self, images):
        x = tf.cast(images, tf.float32)
        return self.detector.decode_predictions(self.detector(x, training=False), x)

    def backbone_change(self) -> float:
        """||w - w0|| / ||w0|| over the trained backbone variables (0 when frozen)."""
        if not self.backbone:
            return 0.0
        diff = sum(float(np.sum((v.numpy() - w) ** 2)) for v, w in zip(self.backbone,
                                                                        self._initial))
        return math.sqrt(diff / sum(float(np.sum(w ** 2)) for w in self._initial))


def train(trainer: Trainer, train_images: data.DetectionImages, schedule: tuple,
          channels: int, cfg: DetectionConfig, writer) -> dict:
    """Runs the steps of `schedule` (data.training_schedule); returns the training record
    (losses, timing)."""
    ds = data.batches(train_images, schedule, channels, cfg.max_size, cfg.batch_size,
                      data.training_targets(train_images), drop_remainder=True)
    start, losses, it = time.time(), [], 0
    for _, images, _, boxes, labels in ds:
        loss, lr = trainer.train_step(images, boxes, labels)
        losses.append(float(loss))
        it += 1
        if not math.isfinite(losses[-1]):
            raise ConfigError(f"the detection loss became {losses[-1]} at iteration {it}; "
                              f"lower --learning_rate (now {cfg.learning_rate})")
        if it % cfg.log_every == 0 or it == cfg.iterations:
            # Keras keeps the mean of each output's loss (focal, Huber) since the last reset.
            trackers = [m for m in trainer.detector.metrics if m.name.endswith("_loss")]
            parts = {m.name: float(m.result()) for m in trackers}
            with writer.as_default():
                tf.summary.scalar("train/loss", np.mean(losses[-cfg.log_every:]), step=it)
                tf.summary.scalar("train/learning_rate", float(lr), step=it)
                for name, value in parts.items():
                    tf.summary.scalar(f"train/{name}", value, step=it)
            for m in trackers:
                m.reset_state()
            logging.info("iteration %d/%d: loss %.4f (%s), lr %.2e (%.2f it/s)", it,
                         cfg.iterations, np.mean(losses[-cfg.log_every:]),
                         ", ".join(f"{k} {v:.4f}" for k, v in parts.items()), float(lr),
                         it / (time.time() - start))
    train_s = time.time() - start
    return {"iterations": it, "final_loss": float(np.mean(losses[-cfg.log_every:]))
            if losses else None, "train_s": train_s,
            "train_images_per_s": it * cfg.batch_size / train_s if it else None}


def detect(trainer: Trainer, test_images: data.DetectionImages, channels: int,
           cfg: DetectionConfig) -> list:
    """Per test image (float [D, 4] VOC boxes, float [D] scores, int [D] classes); empty for
    an undecodable image."""
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    detections = [empty] * len(test_images.images)
    targets = data.training_targets(test_images)
    ds = data.batches(test_images, data.test_schedule(test_images, cfg.test_size), channels,
                      cfg.max_size, cfg.batch_size, targets, drop_remainder=False)
    progress = Progress(f"detections on {test_images.name}", len(test_images.images))
    for indices, images, scales, _, _ in ds:
        out = {k: v.numpy() for k, v in trainer.predict(images).items()}
        for row, (i, scale) in enumerate(zip(indices.numpy(), scales.numpy())):
            n, image = int(out["num_detections"][row]), test_images.images[i]
            detections[i] = (data.to_voc_boxes(out["boxes"][row, :n], scale, image.width,
                                               image.height),
                             out["confidence"][row, :n], out["labels"][row, :n])
        progress.update(len(indices))
    return detections


# ------------------------------------------------------------------------------ the run

def _open(cfg: DetectionConfig) -> tuple:
    """(training images, test images) as the flags name them."""
    splits = [voc.open_split(cfg.voc, cfg.train_split, cfg.data_dir)]
    if cfg.voc2012:
        splits.append(voc.open_split(cfg.voc2012, cfg.train_split, cfg.data_dir))
        if splits[1].name == splits[0].name:
            raise ConfigError(f"--voc2012={cfg.voc2012} names the same images as --voc="
                              f"{cfg.voc} ({splits[0].name}); pass the VOCdevkit/VOC2012 "
                              "folder itself (or tfds:voc/2012)")
    return data.combine(splits), data.combine([voc.open_split(cfg.voc, cfg.test_split,
                                                              cfg.data_dir)])


def run(cfg: DetectionConfig) -> dict:
    """Trains and evaluates the detector as `cfg` says and writes the JSON; returns it."""
    cfg = validate(cfg)
    cli.log_config(cfg)
    keras.utils.set_random_seed(cfg.seed)  # the heads' initial weights
    start = time.time()
    backbone = ExportedBackbone(cfg.model)
    channels = backbone.channels
    plan = pyramid_plan(backbone.shapes, backbone.architecture("the pyramid"))
    del backbone  # the detector loads its own copy of the weights
    train_images, test_images = _open(cfg)
    schedule = data.training_schedule(train_images, cfg.iterations, cfg.batch_size,
                                      cfg.train_sizes, cfg.seed) if cfg.iterations else None
    module = tf.saved_model.load(cfg.model)
    if "conv_features" not in module.signatures:
        raise ConfigError(f"--model={cfg.model} has no conv_features signature; export it "
                          "again with the current dc_tf")
    smallest = data.ceil_multiple(min(cfg.train_sizes + (cfg.test_size,)))
    try:
        module.signatures["conv_features"](images=tf.zeros([1, smallest, smallest, channels],
                                                           tf.uint8))
    except tf.errors.InvalidArgumentError as e:
        raise ConfigError(f"--train_sizes / --test_size: the export rejects {smallest}-px "
                          f"images ({e.message.splitlines()[0]}); raise the sizes") from e
    detector, backbone_variables = build_detector(
        module, plan, channels, len(voc.CLASSES), cfg.mode == "frozen", cfg.head_convs,
        cfg.head_norm, cfg.score_threshold, cfg.nms_iou, cfg.max_detections)
    trainer = Trainer(detector, backbone_variables, cfg)
    os.makedirs(cfg.logdir, exist_ok=True)
    writer = tf.summary.create_file_writer(cfg.logdir)
    record = {"iterations": 0, "final_loss": None, "train_s": 0.0, "train_images_per_s": None}
    if cfg.iterations:
        record = train(trainer, train_images, schedule, channels, cfg, writer)
    tick = time.time()
    detections = detect(trainer, test_images, channels, cfg)
    test_s = time.time() - tick
    aps, mean_ap = metrics.voc_detection_map(detections, data.evaluation_truth(test_images),
                                             len(voc.CLASSES), 0.5, cfg.interpolation)
    ap = voc.ap_dict(aps)
    with writer.as_default():
        for name, value in ap.items():
            if value is not None:
                tf.summary.scalar(f"ap/{name}", value, step=record["iterations"])
        tf.summary.scalar("map", mean_ap, step=record["iterations"])
    writer.close()
    report = {
        "program": "eval.voc_detection", "config": dataclasses.asdict(cfg), "mode": cfg.mode,
        "model": cfg.model, "detector": "keras_hub RetinaNetObjectDetector",
        "pyramid": dataclasses.asdict(plan), "train": train_images.name,
        "test": test_images.name, "num_train": len(train_images.images),
        "num_test": len(test_images.images),
        "missing_images": {"train": train_images.missing, "test": test_images.missing},
        "trained_values": int(sum(np.prod(p.shape) for p in trainer.params)),
        "backbone_relative_change": trainer.backbone_change(), **record,
        "detections": int(sum(len(d[1]) for d in detections)),
        "metric": f"VOC07 AP@0.5, {cfg.interpolation}, difficult ignored", "ap": ap,
        "map": mean_ap, "test_s": test_s,
        "test_images_per_s": len(test_images.images) / test_s, "total_s": time.time() - start}
    cli.write_report(cfg.output, report)
    return report


def markdown_table(report: dict) -> str:
    """Per-class AP % and mAP."""
    return voc.ap_table(f"VOC07 detection, {report['mode']}, {report['iterations']} iterations: "
                        f"{report['model']} ({report['train']} -> {report['test']}), "
                        f"{report['metric']}, AP %", report["ap"], report["map"])


# ------------------------------------------------------------------------------ command line

_LISTS = {"lr_steps": int, "train_sizes": int}


def _define_flags() -> None:
    """Defines one flag per DetectionConfig field (here, so importing the module defines none)."""
    cli.define_flags(DetectionConfig, _HELP, lists=tuple(_LISTS),
                     required=("model", "voc", "output"))
    flags.adopt_module_key_flags(cli)  # listed by --help as this program's


def _config_from_flags() -> DetectionConfig:
    values = cli.parse_lists(cli.flag_values(DetectionConfig), _LISTS)
    for flag in _LISTS:
        if not values[flag]:
            raise ConfigError(f"--{flag} is empty; give at least one value")
    return DetectionConfig(**values)


def entry_point():
    cli.run_program(_define_flags, _config_from_flags, run, markdown_table)


if __name__ == "__main__":
    entry_point()
