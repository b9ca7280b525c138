"""The four visualisations of a trained run, each from a frozen `VisualizeConfig` to files.

`run(cfg)` writes PNGs to cfg.output_dir and the same images as TensorBoard summaries to
cfg.logdir (step = the checkpoint's epochs, or the assignment's epoch), plus the projector files
there; it returns the paths of what it wrote.
"""

import dataclasses
import json
import math
import os

import numpy as np
import tensorflow as tf
from absl import logging

from dc_core import fileio
from dc_tf import models
from dc_tf.config import ConfigError, TrainConfig
from dc_tf.run_dir import RunDir
from dc_tf.visualization import activations, ascent, cluster_montage, montage, projector, trained

COMMANDS = ("filters", "top_images", "clusters", "projector")
CELL_SIZE = 64  # smaller images are enlarged to at least this, pixel for pixel


@dataclasses.dataclass(frozen=True)
class VisualizeConfig:
    """One command's settings; fields are the flags (the command is the positional argument)."""
    command: str
    model: str
    layer: str = ""
    channels: tuple = ()
    num_channels: int = 16
    steps: int = ascent.STEPS
    learning_rate: float = 0.0
    seed: int = 0
    top_k: int = activations.TOP_K
    dataset: str = ""
    data_dir: str = ""
    max_examples: int = 0
    batch_size: int = 256
    epoch: str = "final"
    clusters_shown: int = cluster_montage.CLUSTERS_SHOWN
    images_per_cluster: int = cluster_montage.IMAGES_PER_CLUSTER
    num_images: int = 1000
    sprite_size: int = 0
    output_dir: str = ""
    logdir: str = ""


def validate(cfg: VisualizeConfig) -> VisualizeConfig:
    """Checks what needs no model and fills output_dir and logdir."""
    if cfg.command not in COMMANDS:
        raise ConfigError(f"unknown command {cfg.command!r}; choose one of {', '.join(COMMANDS)}")
    if not cfg.model:
        raise ConfigError("--model: name the --model_dir of a dc_tf.train run")
    for flag in ("num_channels", "steps", "top_k", "batch_size", "clusters_shown",
                 "images_per_cluster", "num_images"):
        if getattr(cfg, flag) < 1:
            raise ConfigError(f"--{flag}={getattr(cfg, flag)} must be a positive integer")
    for flag in ("learning_rate", "max_examples", "sprite_size"):
        if getattr(cfg, flag) < 0:
            raise ConfigError(f"--{flag}={getattr(cfg, flag)} must be >= 0 (0: the default)")
    if cfg.epoch != "final" and not (cfg.epoch.isdigit()):
        raise ConfigError(f"--epoch={cfg.epoch}: give 'final' or an epoch number")
    return dataclasses.replace(
        cfg, output_dir=cfg.output_dir or os.path.join(cfg.model, "visualize"),
        logdir=cfg.logdir or os.path.join(cfg.model, "logs", "visualize"))


def run(cfg: VisualizeConfig) -> list:
    """Runs cfg.command; returns the paths written."""
    cfg = validate(cfg)
    run_cfg = trained.load_config(cfg.model)
    writer = tf.summary.create_file_writer(cfg.logdir)
    try:
        command = {"filters": filters, "top_images": top_images, "clusters": cluster_images,
                   "projector": embedding_projector}[cfg.command]
        paths = command(cfg, run_cfg, writer)
    finally:
        writer.close()
    for path in paths:
        logging.info("wrote %s", path)
    return paths


def _layer_and_channels(cfg: VisualizeConfig, backbone) -> tuple:
    """(layer, channels): --layer (default the deepest conv endpoint) and --channels (default
    --num_channels spread evenly over the layer's width, first and last included)."""
    layer = cfg.layer or trained.deepest_conv(backbone)
    trained.check_layer(backbone, layer)
    width = int(backbone.output[layer].shape[-1])
    if not cfg.channels:
        return layer, np.unique(np.linspace(0, width - 1, min(cfg.num_channels, width))
                                .round().astype(int)).tolist()
    try:
        channels = [int(c) for c in cfg.channels]
    except ValueError:
        raise ConfigError(f"--channels={','.join(cfg.channels)}: give channel numbers") from None
    bad = [c for c in channels if not 0 <= c < width]
    if bad:
        raise ConfigError(f"--channels: {bad} out of range; {layer} has channels 0..{width - 1}")
    return layer, channels


def _cells(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> uint8 RGB cells of at least CELL_SIZE pixels."""
    return montage.enlarge(montage.to_rgb(images), CELL_SIZE)


def filters(cfg: VisualizeConfig, run_cfg: TrainConfig, writer) -> list:
    """One grid of gradient-ascent images, a captioned cell per channel."""
    backbone, epochs = trained.restore_backbone(run_cfg)
    layer, channels = _layer_and_channels(cfg, backbone)
    lr = cfg.learning_rate or ascent.default_learning_rate(layer)
    result = ascent.ascend(backbone, layer, channels, cfg.steps, lr, cfg.seed)
    logging.info("%s: mean channel objective %.3f -> %.3f", layer, result.start.mean(),
                 result.end.mean())
    cells = np.stack([montage.caption(cell, f"channel {c}") for c, cell in
                      zip(channels, _cells(ascent.deprocess(result.images)))])
    image = montage.caption(montage.grid(cells, math.ceil(math.sqrt(len(cells)))),
                            f"{run_cfg.arch} {layer}, {epochs} epochs: {cfg.steps} steps, lr {lr}")
    montage.write_images(writer, f"filters/{layer}", [image], epochs,
                         f"gradient ascent, channels {channels}")
    return [montage.save_png(os.path.join(cfg.output_dir, f"filters_{layer}.png"), image)]


def top_images(cfg: VisualizeConfig, run_cfg: TrainConfig, writer) -> list:
    """A 3x3 montage per channel of its top-activating images, and their list in JSON."""
    backbone, epochs = trained.restore_backbone(run_cfg)
    layer, channels = _layer_and_channels(cfg, backbone)
    source = trained.open_source(run_cfg, cfg.dataset, cfg.data_dir, cfg.max_examples)
    view = (run_cfg.resize_size, run_cfg.image_size, run_cfg.channels)
    dataset = trained.view_dataset(source, *view, cfg.batch_size)
    indices, scores = activations.top_images(backbone, layer, channels, dataset,
                                             source.num_examples, cfg.top_k)
    views = trained.load_views(source, indices.ravel(), *view)
    images, paths, table = [], [], []
    for c, best, best_scores in zip(channels, indices, scores):
        grid = montage.grid(_cells(np.stack([views[i] for i in best.tolist()])),
                            math.ceil(math.sqrt(cfg.top_k)), cells=cfg.top_k)
        images.append(montage.caption(grid, f"{layer} channel {c}"))
        paths.append(montage.save_png(os.path.join(
            cfg.output_dir, "top_images", f"{layer}_channel_{c:04d}.png"), images[-1]))
        table.append({"channel": c, "examples": [
            {"index": int(i), "source": source.describe(int(i)), "score": float(s)}
            for i, s in zip(best, best_scores)]})
    montage.write_images(writer, f"top_images/{layer}", montage.same_size(images), epochs,
                         f"top {cfg.top_k} images of {source.name} per channel")
    path = os.path.join(cfg.output_dir, "top_images", f"{layer}.json")
    fileio.atomic_write(path, json.dumps({"layer": layer, "dataset": source.name,
                                          "epochs": epochs, "channels": table}, indent=1))
    return paths + [path]


def _assignment(cfg: VisualizeConfig, run_cfg: TrainConfig) -> tuple:
    """(int32 [N] assignment of --epoch, its epoch number)."""
    try:
        assignment = RunDir(cfg.model).load_assignment(cfg.epoch)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return assignment, run_cfg.epochs if cfg.epoch == "final" else int(cfg.epoch)


def cluster_images(cfg: VisualizeConfig, run_cfg: TrainConfig, writer) -> list:
    """The montage the training callback logs, for any saved assignment."""
    assignment, epoch = _assignment(cfg, run_cfg)
    source = trained.open_source(run_cfg)
    try:
        image = cluster_montage.cluster_montage(source, assignment, (run_cfg.seed, epoch),
                                                cfg.clusters_shown, cfg.images_per_cluster)
    except ValueError as e:
        raise ConfigError(f"--model={cfg.model}: {e}") from None
    montage.write_images(writer, "clusters", [image], epoch, f"random clusters, {cfg.epoch}")
    return [montage.save_png(os.path.join(cfg.output_dir, f"clusters_{cfg.epoch}.png"), image)]


def embedding_projector(cfg: VisualizeConfig, run_cfg: TrainConfig, writer) -> list:
    """Features of --num_images random training images (the first ones of a sequentially read
    source) at --layer (default: the clustered feature; conv maps spatially averaged)."""
    backbone, epochs = trained.restore_backbone(run_cfg)
    layer = cfg.layer or models.cluster_endpoint(run_cfg.arch)
    trained.check_layer(backbone, layer)
    source = trained.open_source(run_cfg)
    n = min(cfg.num_images, source.num_examples)
    sample = (np.sort(np.random.default_rng(cfg.seed).choice(source.num_examples, n, False))
              if source.random_access else np.arange(n))
    size = cfg.sprite_size or min(run_cfg.image_size, CELL_SIZE)
    if projector.sprite_columns(n) * size > projector.SPRITE_MAX_SIZE:
        raise ConfigError(f"--num_images={n} with --sprite_size={size} makes a sprite larger "
                          f"than TensorBoard's {projector.SPRITE_MAX_SIZE} px; lower either")

    @tf.function(reduce_retracing=True)
    def embed(images):
        x = backbone(images, training=False)[layer]
        thumbs = tf.image.resize(images, [size, size], antialias=True)
        return (tf.reduce_mean(x, [1, 2]) if x.shape.rank == 4 else x), thumbs

    features, thumbs, indices = [], [], []
    progress = trained.Progress(f"{layer} features", n)
    for images, idx, _ in trained.view_dataset(source, run_cfg.resize_size, run_cfg.image_size,
                                               run_cfg.channels, cfg.batch_size, sample):
        x, t = embed(images)
        features.append(x.numpy()), thumbs.append(montage.to_uint8(t.numpy()))
        indices.append(idx.numpy())
        progress.update(len(indices[-1]))
    indices = np.concatenate(indices)
    columns = {"index": indices.tolist(), "source": [source.describe(int(i)) for i in indices]}
    try:
        assignment, epoch = _assignment(cfg, run_cfg)
        columns[f"cluster_{cfg.epoch}"] = assignment[indices].tolist()
    except ConfigError as e:
        logging.warning("no cluster column: %s", e)
    if source.labels is not None:
        columns["label"] = source.labels[indices].tolist()
    path = projector.write_projector(cfg.logdir, layer, np.concatenate(features), columns,
                                     np.concatenate(thumbs))
    with writer.as_default(step=epochs):
        tf.summary.text("projector", f"{len(indices)} images of {source.name}, {layer} of "
                        f"{run_cfg.arch} after {epochs} epochs; open the Projector tab")
    return [path]
