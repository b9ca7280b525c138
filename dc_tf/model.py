"""The models of the two methods: DeepClusterModel (a backbone, a k-way top layer, pseudo-labels)
and DeepClusterV2Model (a projection head and frozen prototypes); each a custom train_step."""

import keras
import tensorflow as tf

from dc_tf import distribute, optim


class DeepClusterModel(keras.Model):
    """Trains a backbone to predict the pseudo-labels of the current clustering.

    State shared with the ReclusterCallback lives in variables, never in Python objects:
      pseudo_labels: int32 [N], the cluster of every example (-1 = excluded); train_step reads
        the labels of a batch by example index.
      accept: float32 [k], the balanced sampler's per-cluster acceptance probability.
      epoch: int64, the epoch being trained; the training pipeline keys its draws by it.
    The backbone is trained by SGD with momentum, whose state persists across epochs; the top
    layer by its own momentum-free SGD, re-initialised with the top layer at every reclustering
    (docs/protocols.md §2). Weight decay is the coupled L2 of PyTorch's SGD: `wd * w` is added to
    every trained variable's gradient, BN parameters and biases included.

    Args:
      backbone: Keras model mapping float32 images to a dict of endpoints.
      head_endpoint: the endpoint the top layer reads (fc7 after ReLU; pooled features).
      num_examples: N.
      num_clusters: k, the width of the top layer.
      weight_decay: coupled L2 coefficient.
      seed: seed of the top layer's initialisations.
    """

    def __init__(self, backbone: keras.Model, head_endpoint: str, num_examples: int,
                 num_clusters: int, weight_decay: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head_endpoint = head_endpoint
        self.weight_decay = weight_decay
        self.num_clusters = num_clusters
        self.head = keras.layers.Dense(
            num_clusters, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01, seed=seed),
            name="top_layer", dtype="float32")  # float32 logits under mixed precision
        self.head.build(backbone.output[head_endpoint].shape)
        self._head_seed = keras.random.SeedGenerator(seed)
        self.pseudo_labels = self.add_weight(shape=(num_examples,), dtype="int32",
                                             initializer="zeros", trainable=False,
                                             name="pseudo_labels")
        self.accept = self.add_weight(shape=(num_clusters,), dtype="float32", initializer="ones",
                                      trainable=False, name="accept")
        self.epoch = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                     trainable=False, name="epoch")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.head_optimizer = None

    def compile(self, backbone_optimizer, head_optimizer, **kwargs):
        super().compile(optimizer=backbone_optimizer, **kwargs)
        self.head_optimizer = head_optimizer
        # Built now so that checkpoints restore their slots before the first step.
        backbone_optimizer.build(self.backbone.trainable_variables)
        head_optimizer.build(self.head.trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: __init__ and compile() build every variable.

        Keras 3.15 runs this at the start of fit() when the model lives in a tf.distribute scope:
        it takes a batch from the training iterator and, under MultiWorkerMirroredStrategy,
        fails to reduce it (keras-team/keras#20585).
        """

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def call(self, images, training=False):
        return self.head(self.backbone(images, training=training)[self.head_endpoint])

    def train_step(self, data):
        images, indices = data
        labels = tf.gather(self.pseudo_labels, indices)
        backbone_vars = self.backbone.trainable_variables
        head_vars = self.head.trainable_variables
        with tf.GradientTape() as tape:
            logits = self(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        grads = tape.gradient(loss, backbone_vars + head_vars)
        grads = [g + self.weight_decay * v for g, v in zip(grads, backbone_vars + head_vars)]
        self.optimizer.apply(grads[:len(backbone_vars)], backbone_vars)
        self.head_optimizer.apply(grads[len(backbone_vars):], head_vars)
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(labels, logits)
        results = {m.name: m.result() for m in self.metrics}
        if distribute.is_multi_worker(tf.distribute.get_strategy()):
            # Keras 3.15 averages each worker's results over replicas *and axis 0*, which a
            # scalar lacks (keras-team/keras#20585): give it one.
            results = {name: value[None] for name, value in results.items()}
        return results

    def reset_head(self) -> None:
        """A fresh top layer, N(0, 0.01) weights and zero bias, and a fresh head optimizer."""
        self.head.kernel.assign(keras.random.normal(self.head.kernel.shape, stddev=0.01,
                                                    seed=self._head_seed))
        self.head.bias.assign(tf.zeros_like(self.head.bias))
        learning_rate = self.head_optimizer.learning_rate  # a variable of the optimizer too
        for v in self.head_optimizer.variables:
            if v is not learning_rate:
                v.assign(tf.zeros_like(v))


def spread_penalty(features: tf.Tensor) -> tf.Tensor:
    """-log of the participation ratio of float32 [n, ...] features over their n rows.

    Each row is flattened (a feature map counts as one vector of c = h * w * channels values).
    With C the covariance of the rows, the participation ratio tr(C)^2 / ||C||_F^2 counts the
    directions the features spread over: 1 when one direction holds all their variance, up to
    min(n - 1, c) when the variance is spread evenly. The penalty is scale-free, so it reshapes
    the spectrum without pulling the features' size. Computed on the [n, n] Gram matrix of the
    centred rows, which has C's non-zero eigenvalues (times n - 1).
    """
    rows = tf.reshape(features, [tf.shape(features)[0], -1])
    centred = rows - tf.reduce_mean(rows, axis=0, keepdims=True)
    gram = tf.matmul(centred, centred, transpose_b=True)
    return (tf.math.log(tf.reduce_sum(tf.square(gram)) + 1e-12)
            - 2.0 * tf.math.log(tf.linalg.trace(gram) + 1e-6))


class DeepClusterV2Model(keras.Model):
    """DeepCluster-v2 (docs/protocols.md §9): a backbone, a projection head onto the unit sphere,
    and frozen prototype heads that predict each example's cluster, with a custom train_step.

    State shared with the PrototypeCallback lives in variables:
      prototypes: one float32 [d, k_h] matrix per head, the centroids of the head's last
        spherical k-means (never trained: the callback assigns them).
      assignments: int32 [P, N], each example's cluster under each head (-1: none yet).
      bank: float32 [N, 2, d], the unit embeddings of every example's two global crops of the
        current epoch, written by example index in train_step; clustered at the next epoch start.
      epoch: int64, the epoch being trained; the multi-crop pipeline keys its draws by it.
    The loss is, per head, the cross-entropy of (embedding . prototypes) / temperature against
    the example's cluster over every crop, averaged over heads; with `feature_spread` > 0,
    dc_tf adds that weight times the sum of `spread_penalty` over `spread_endpoints` of the
    global crops (not in the published method: it keeps the last convolutions, fc6 and fc7 from
    collapsing onto a few directions, bench/RESULTS.md §10). Backbone and projection train
    by SGD with momentum and coupled L2 weight decay, as DeepClusterModel's backbone, optionally
    through LARC (`optim.larc`).

    Args:
      backbone: Keras model mapping float32 images to a dict of endpoints.
      head_endpoint: the endpoint the projection head reads (fc7; pooled features).
      num_examples: N.
      num_prototypes: k of each head.
      projection_dims: (hidden, output d) widths of the projection head.
      temperature: softmax temperature.
      weight_decay: coupled L2 coefficient.
      seed: seed of the projection head's initialisation.
      lars_trust: LARC's trust coefficient; None trains by plain SGD.
      global_crops: how many of a batch's views are global (image_size) crops; the first two
        are written to the bank.
      feature_spread: weight of `spread_penalty` (0: the published objective).
      spread_endpoints: the endpoints it spreads (`models.spread_endpoints`).
    """

    def __init__(self, backbone: keras.Model, head_endpoint: str, num_examples: int,
                 num_prototypes: tuple, projection_dims: tuple, temperature: float,
                 weight_decay: float, seed: int, lars_trust: float | None = None,
                 global_crops: int = 2, feature_spread: float = 0.0,
                 spread_endpoints: tuple = (), **kwargs):
        super().__init__(**kwargs)
        self.backbone, self.head_endpoint = backbone, head_endpoint
        self.temperature, self.weight_decay = temperature, weight_decay
        self.feature_spread, self.spread_endpoints = feature_spread, tuple(spread_endpoints)
        self.lars_trust, self.global_crops = lars_trust, global_crops
        hidden, dim = projection_dims
        init = keras.initializers.GlorotUniform
        self.projection = keras.Sequential([
            keras.layers.Dense(hidden, kernel_initializer=init(seed=seed)),
            keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5),
            keras.layers.ReLU(),
            keras.layers.Dense(dim, kernel_initializer=init(seed=seed + 1), dtype="float32")],
            name="projection")
        self.projection.build(backbone.output[head_endpoint].shape)
        # One attribute per head: tf.train.Checkpoint saves attributes, not lists of variables.
        self.num_heads = len(num_prototypes)
        for h, k in enumerate(num_prototypes):
            setattr(self, f"prototypes_{h}", self.add_weight(
                shape=(dim, k), initializer="zeros", trainable=False, name=f"prototypes_{h}"))
        self.assignments = self.add_weight(
            shape=(len(num_prototypes), num_examples), dtype="int32", trainable=False,
            initializer=keras.initializers.Constant(-1), name="assignments")
        self.bank = self.add_weight(shape=(num_examples, 2, dim), initializer="zeros",
                                    trainable=False, name="bank")
        self.epoch = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                     trainable=False, name="epoch")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def compile(self, optimizer, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        optimizer.build(self.trained_variables)  # so that checkpoints restore its slots

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Nothing to build: __init__ and compile() build every variable (as DeepClusterModel)."""

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    @property
    def prototypes(self) -> list:
        """float32 [d, k_h] prototypes of every head h."""
        return [getattr(self, f"prototypes_{h}") for h in range(self.num_heads)]

    @property
    def trained_variables(self) -> list:
        return self.backbone.trainable_variables + self.projection.trainable_variables

    def call(self, images, training=False):
        """float32 [B, d] unit embeddings of float32 images."""
        return self._embed(images, training)[1]

    def _embed(self, images, training):
        """(the backbone's endpoints, float32 [B, d] unit embeddings) of float32 images."""
        outputs = self.backbone(images, training=training)
        z = tf.cast(self.projection(outputs[self.head_endpoint], training=training), tf.float32)
        return outputs, tf.math.l2_normalize(z, axis=1)

    def train_step(self, data):
        views, indices = data
        batch = tf.shape(indices)[0]
        with tf.GradientTape() as tape:
            # The global crops in one batch, then the local ones (another size) in another;
            # rows are view-major: view v of example i is row v * B + i.
            g = self.global_crops
            outputs, global_embedding = self._embed(tf.concat(views[:g], 0), training=True)
            embedded = [global_embedding]
            if len(views) > g:
                embedded.append(self(tf.concat(views[g:], 0), training=True))
            z = tf.concat(embedded, 0)
            losses, first_logits, first_labels = [], None, None
            for head, prototypes in enumerate(self.prototypes):
                labels = tf.tile(tf.gather(self.assignments[head], indices), [len(views)])
                logits = tf.matmul(z, prototypes) / self.temperature
                known = tf.cast(labels >= 0, tf.float32)
                cross_entropy = keras.losses.sparse_categorical_crossentropy(
                    tf.maximum(labels, 0), logits, from_logits=True)
                losses.append(tf.reduce_sum(cross_entropy * known)
                              / tf.maximum(tf.reduce_sum(known), 1.0))
                if head == 0:
                    first_logits, first_labels = logits, labels
            loss = tf.add_n(losses) / len(losses)
            if self.feature_spread:
                loss += self.feature_spread * tf.add_n([
                    spread_penalty(tf.cast(outputs[name], tf.float32))
                    for name in self.spread_endpoints])
        variables = self.trained_variables
        grads = tape.gradient(loss, variables)
        if self.lars_trust is None:
            grads = [g + self.weight_decay * v for g, v in zip(grads, variables)]
        else:
            grads = optim.larc(grads, variables, self.weight_decay, self.lars_trust)
        self.optimizer.apply(grads, variables)
        # The bank keeps this epoch's (detached) embeddings of the first two global crops for
        # the next clustering.
        global_z = tf.stop_gradient(embedded[0])
        self._write_bank(indices, tf.stack([global_z[:batch], global_z[batch:2 * batch]], axis=1))
        self.loss_tracker.update_state(loss)
        self.accuracy_tracker.update_state(first_labels, first_logits)
        results = {m.name: m.result() for m in self.metrics}
        if distribute.is_multi_worker(tf.distribute.get_strategy()):
            results = {name: value[None] for name, value in results.items()}  # as DeepClusterModel
        return results

    def _write_bank(self, indices, rows):
        """bank[indices] = rows; under tf.distribute, every replica's rows into every copy.

        A mirrored variable takes no scatter in a replica's context: the rows of all replicas
        (all workers) are gathered, and one update in the cross-replica context writes them
        into each local copy, so that every copy, on every worker, holds the whole bank. The
        gather is an all-reduce of each replica's rows placed at its offset in the global batch
        (MultiWorkerMirroredStrategy's all_gather fails on CPU workers, TF 2.21).
        """
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            self.bank.value.scatter_nd_update(indices[:, None], rows)
            return
        batch = tf.shape(indices)[0]
        places = (context.replica_id_in_sync_group * batch + tf.range(batch))[:, None]

        def gather(x):
            shape = tf.concat([[context.num_replicas_in_sync * batch], tf.shape(x)[1:]], 0)
            return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      tf.scatter_nd(places, x, shape))

        def update(strategy, indices, rows):
            strategy.extended.update(
                self.bank.value, lambda copy, i, r: copy.scatter_nd_update(i, r),
                args=(indices, rows), group=False)
        context.merge_call(update, args=(gather(indices)[:, None], gather(rows)))

    def export_network(self) -> keras.Model:
        """The backbone's endpoints plus `embedding` (the unit projection), for the export."""
        outputs = dict(self.backbone.output)
        z = self.projection(outputs[self.head_endpoint], training=False)  # float32
        outputs["embedding"] = keras.layers.UnitNormalization(axis=1, name="embedding")(z)
        return keras.Model(self.backbone.input, outputs, name=f"{self.backbone.name}_v2")
