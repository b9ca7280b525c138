"""The training methods, each the same few parts that dc_tf.train puts together: the model, the
training stream, the labeller (the callback that makes the targets of every epoch and the final
clustering), and the network that the export carries.

    DeepCluster    k-means (or PIC) of PCA-whitened features every `reassign` epochs, a fresh
                   top layer, class-balanced sampling of the pseudo-labels (Caron et al. 2018).
    Supervised     DeepCluster's model and sampler on the ground-truth labels: the baseline.
    DeepClusterV2  projection head, memory bank, spherical k-means into frozen prototypes at
                   every epoch start, multi-crop (Caron et al. 2020; docs/protocols.md §9).

`for_config(cfg)` is the one place that chooses by `cfg.method`.
"""

import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from dc_tf import config, model as networks, models, optim
from dc_tf.checkpoint import RunCheckpoint
from dc_tf.data import Source, all_labels, pipelines
from dc_tf.distribute import Workers
from dc_tf.prototypes import PrototypeCallback
from dc_tf.recluster import Clusterer, FixedLabelsCallback, ReclusterCallback


class Method:
    """What the methods share: the configuration completed with the data, its checks, the
    backbone, the restored model and an epoch of training data. A method adds `build_model`,
    `stream` (its training stream), `labeller`, `exported` and `training_line`.

    Attributes:
      cfg: the configuration (with the data's fields once `resolve` has run).
      clusters: whether its labeller clusters (a final clustering, a montage every epoch).
      assign_endpoint: the exported endpoint that the export's `assign` signature reads.
    """

    clusters = True

    def __init__(self, cfg: config.TrainConfig):
        self.cfg = cfg
        self.assign_endpoint = models.cluster_endpoint(cfg.arch)

    def resolve(self, source: Source) -> config.TrainConfig:
        """The configuration completed with what the opened dataset says."""
        self.cfg = config.with_data(self.cfg, source.channels, source.num_examples)
        return self.cfg

    def backbone(self) -> keras.Model:
        """The network trained (`cfg` with its data filled in), seeded by cfg.seed."""
        cfg = self.cfg
        return models.build_backbone(cfg.arch, cfg.image_size, cfg.channels, cfg.sobel,
                                     cfg.mean, cfg.std, seed=cfg.seed)

    def check(self, backbone: keras.Model) -> None:
        """What depends on the opened data and the built network."""
        config.check_against_data(
            self.cfg, backbone.output[models.cluster_endpoint(self.cfg.arch)].shape[-1])

    def training_data(self, source: Source, model: keras.Model, workers: Workers):
        """An epoch of the method's `stream`, one pipeline per worker: each feeds its replicas
        batches of their share of cfg.batch_size, and takes its share of the epoch's steps."""
        cfg, steps = self.cfg, self.steps_per_epoch

        def make(batch_size: int, shard: tuple = (1, 0)) -> tf.data.Dataset:
            batches = steps * cfg.batch_size // (batch_size * shard[0])
            return self.stream(source, model, batch_size, batches, shard)
        return workers.datasets(make, cfg.batch_size)

    def restored_model(self, backbone: keras.Model, workers: Workers,
                       resume_from: Optional[str]) -> tuple:
        """(model, RunCheckpoint, epochs done): the method's model (`build_model`) restored from
        `resume_from`, the checkpoint the chief's claim chose; the other workers take the newest
        checkpoint that loads in the chief's folder, the same one. The run's metrics of later
        epochs are dropped."""
        cfg = self.cfg
        with workers.scope():
            model = self.build_model(backbone)
            checkpoint = RunCheckpoint(
                model, workers.run.checkpoints,
                restore_from="" if workers.chief else workers.chief_run.checkpoints)
            epochs_done = checkpoint.restore(resume_from)
        workers.check_same_epoch(epochs_done)
        if not optim.scheduled(cfg):  # the flag wins over the checkpoint's rate
            for optimizer in (model.optimizer, getattr(model, "head_optimizer", None)):
                if optimizer is not None:
                    optimizer.learning_rate = cfg.learning_rate
        workers.run.truncate_metrics(epochs_done)
        return model, checkpoint, epochs_done


class DeepCluster(Method):
    """DeepCluster (v1): the backbone's cluster endpoint is clustered; the export's `assign`
    reads the same endpoint."""

    def check(self, backbone: keras.Model) -> None:
        super().check(backbone)
        cfg = self.cfg
        if cfg.num_examples < 39 * cfg.num_clusters:
            logging.warning("%d images for --num_clusters=%d is fewer than the 39 per cluster "
                            "FAISS asks for; clusters will be small and noisy",
                            cfg.num_examples, cfg.num_clusters)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.cfg.reassign * self.cfg.num_examples / self.cfg.batch_size)

    def build_model(self, backbone: keras.Model) -> keras.Model:
        """The compiled model on `backbone` with its optimisers and every variable built, ready
        for a checkpoint to restore."""
        cfg = self.cfg
        model = networks.DeepClusterModel(backbone, models.head_endpoint(cfg.arch),
                                          cfg.num_examples, cfg.num_clusters, cfg.weight_decay,
                                          seed=cfg.seed)
        model.compile(backbone_optimizer=keras.optimizers.SGD(cfg.learning_rate,
                                                              momentum=cfg.momentum),
                      head_optimizer=keras.optimizers.SGD(cfg.learning_rate),
                      jit_compile=cfg.jit_compile)
        return model

    def stream(self, source: Source, model: keras.Model, batch_size: int, batches: int,
               shard: tuple) -> tf.data.Dataset:
        """The class-balanced stream of `batches` batches (`pipelines.training_dataset`)."""
        cfg = self.cfg
        return pipelines.training_dataset(
            source, model.pseudo_labels, model.accept, model.epoch, cfg.image_size,
            cfg.crop_scale, cfg.crop_ratio, batch_size, batches, cfg.seed, shard=shard)

    def labeller(self, source: Source, model: keras.Model, workers: Workers, epochs_done: int):
        """The ReclusterCallback: feature pass through the BN-folded backbone, then k-means;
        ready to continue after `epochs_done` epochs."""
        cfg, endpoint = self.cfg, self.assign_endpoint
        with workers.scope():
            folded = models.FoldedBackbone(model.backbone)  # BN folded into the convs: faster pass

        @tf.function
        def infer(images):
            return tf.cast(folded.network(images, training=False)[endpoint], tf.float32)

        order = (np.random.default_rng(cfg.seed).permutation(cfg.num_examples)
                 if source.random_access else None)  # the PCA sample is the head of this order
        labeller = ReclusterCallback(
            infer, folded.refresh,
            lambda: pipelines.feature_dataset(source, cfg.resize_size, cfg.image_size,
                                              pipelines.feature_batch_size(cfg.batch_size),
                                              order),
            Clusterer(cfg.clustering, cfg.num_clusters, cfg.kmeans_iters, cfg.seed,
                      cfg.kmeans_mode),
            cfg.num_examples, cfg.pca_dim, cfg.pca_sample, workers.run.path, cfg.reassign,
            strategy=workers.distributed,
            check_readable=lambda n: config.check_against_data(cfg, None, readable=n))
        labeller.resume(epochs_done)
        return labeller

    def exported(self, model: keras.Model) -> keras.Model:
        """The network the export carries: the backbone."""
        return model.backbone

    def training_line(self) -> str:
        return f"{self.steps_per_epoch} steps of {self.cfg.batch_size} images each"


class Supervised(DeepCluster):
    """The baseline: DeepCluster's model and balanced sampler on the ground-truth labels, with
    one top layer for the whole run; no clustering."""

    clusters = False

    def resolve(self, source: Source) -> config.TrainConfig:
        self.labels = all_labels(source)
        self.cfg = config.with_data(self.cfg, source.channels, source.num_examples,
                                    num_clusters=int(self.labels.max()) + 1)
        return self.cfg

    def check(self, backbone: keras.Model) -> None:
        pass  # the labels fix the classes: nothing to check against the data

    def labeller(self, source: Source, model: keras.Model, workers: Workers, epochs_done: int):
        return FixedLabelsCallback(self.labels, self.cfg.num_clusters, workers.run.path)


class DeepClusterV2(Method):
    """DeepCluster-v2: the embedding (projection head's output) is clustered; the export adds
    the projection head and `assign` reads `embedding`."""

    def __init__(self, cfg: config.TrainConfig):
        super().__init__(cfg)
        self.assign_endpoint = "embedding"

    def backbone(self) -> keras.Model:
        """Without dropout, and of any input size when the local crops have another size than
        the global ones."""
        cfg = self.cfg
        return models.build_backbone(
            cfg.arch, cfg.image_size, cfg.channels, cfg.sobel, cfg.mean, cfg.std, seed=cfg.seed,
            dropout=False, any_size=cfg.local_crops > 0 and cfg.local_crop_size != cfg.image_size)

    @property
    def steps_per_epoch(self) -> int:
        """Every example once an epoch, the last partial batch left out."""
        return self.cfg.num_examples // self.cfg.batch_size

    def build_model(self, backbone: keras.Model) -> keras.Model:
        cfg = self.cfg
        model = networks.DeepClusterV2Model(
            backbone, models.head_endpoint(cfg.arch), cfg.num_examples, cfg.num_prototypes,
            cfg.projection_dims, cfg.temperature, cfg.weight_decay, seed=cfg.seed,
            global_crops=cfg.global_crops, feature_spread=cfg.feature_spread,
            spread_endpoints=models.spread_endpoints(cfg.arch),
            lars_trust=cfg.lars_trust_coefficient if cfg.lars else None)
        model.compile(optimizer=keras.optimizers.SGD(
            optim.learning_rate(cfg, self.steps_per_epoch), momentum=cfg.momentum),
            jit_compile=cfg.jit_compile)
        return model

    def stream(self, source: Source, model: keras.Model, batch_size: int, batches: int,
               shard: tuple) -> tf.data.Dataset:
        """The multi-crop stream: every image once an epoch, in global and local crops."""
        cfg = self.cfg
        return pipelines.multicrop_dataset(
            source, model.epoch, cfg.image_size, cfg.global_crops, cfg.global_crop_scale,
            cfg.local_crops, cfg.local_crop_size, cfg.local_crop_scale, cfg.crop_ratio,
            batch_size, batches, cfg.seed, cfg.color_jitter, cfg.blur, shard=shard)

    def labeller(self, source: Source, model: keras.Model, workers: Workers, epochs_done: int):
        """The PrototypeCallback: spherical k-means of the memory bank at every epoch start;
        ready to continue after `epochs_done` epochs."""
        cfg = self.cfg
        labeller = PrototypeCallback(
            tf.function(lambda images: model(images, training=False)),
            lambda: pipelines.feature_dataset(source, cfg.resize_size, cfg.image_size,
                                              pipelines.feature_batch_size(cfg.batch_size)),
            cfg.num_prototypes, cfg.kmeans_iters, cfg.seed, workers.run.path, source.labels,
            strategy=workers.distributed,
            check_readable=lambda n: config.check_against_data(cfg, None, readable=n))
        labeller.resume(epochs_done)
        return labeller

    def exported(self, model: keras.Model) -> keras.Model:
        """The backbone's endpoints and the projection head's `embedding`."""
        return model.export_network()

    def training_line(self) -> str:
        cfg = self.cfg
        return (f"{self.steps_per_epoch} steps of {cfg.batch_size} images, "
                f"{cfg.global_crops + cfg.local_crops} crops each (DeepCluster-v2)")


def for_config(cfg: config.TrainConfig) -> Method:
    """The method `cfg` trains."""
    if cfg.method == "deepcluster_v2":
        return DeepClusterV2(cfg)
    return Supervised(cfg) if cfg.supervised else DeepCluster(cfg)
