"""DeepClusterModel: a backbone, a k-way top layer, and a custom train_step on pseudo-labels."""

import keras
import tensorflow as tf

from dc_tf import distribute


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
