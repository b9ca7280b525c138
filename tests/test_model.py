"""DeepClusterModel on its own: the top-layer reset and one train_step's update rule."""

import keras
import numpy as np
import tensorflow as tf

from dc_tf import models
from dc_tf.model import DeepClusterModel


def _model(weight_decay=0.0, momentum=0.9, lr=0.1):
    backbone = models.build_backbone("small_vgg", 16, 1, False, (0.5,), (0.25,), seed=0)
    model = DeepClusterModel(backbone, "fc7", num_examples=8, num_clusters=4,
                             weight_decay=weight_decay, seed=0)
    model.compile(keras.optimizers.SGD(lr, momentum=momentum), keras.optimizers.SGD(lr))
    return model


def test_reset_head_reinitialises_weights_and_optimizer_but_keeps_the_learning_rate():
    model = _model()
    model.head.kernel.assign(tf.ones_like(model.head.kernel))
    model.head.bias.assign(tf.ones_like(model.head.bias))
    model.head_optimizer.iterations.assign(7)
    model.reset_head()
    kernel = model.head.kernel.numpy()
    assert abs(kernel.std() - 0.01) < 0.002 and abs(kernel.mean()) < 0.002
    assert not model.head.bias.numpy().any()
    assert int(model.head_optimizer.iterations) == 0
    assert np.isclose(float(model.head_optimizer.learning_rate), 0.1)
    first = kernel.copy()
    model.reset_head()
    assert not np.allclose(first, model.head.kernel.numpy()), "a reset must draw new weights"


def test_train_step_reads_labels_by_index_and_applies_coupled_weight_decay():
    wd, lr = 0.5, 0.1
    model = _model(weight_decay=wd, momentum=0.0, lr=lr)
    model.pseudo_labels.assign(np.array([0, 1, 2, 3, 0, 1, 2, 3], np.int32))
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 1)), tf.float32)
    indices = tf.constant([1, 3, 5, 7], tf.int32)
    model.head.bias.assign(np.ones(4, np.float32))
    bias_before = model.head.bias.numpy().copy()
    kernel_before = model.head.kernel.numpy().copy()
    # d(mean CE)/d(bias) = mean(softmax - onehot) sums to 0 over classes, so the bias step sums
    # to exactly lr * wd * sum(bias): the coupled L2 term of plain SGD.
    logs = model.train_step((images, indices))
    assert np.isfinite(float(logs["loss"]))
    step = bias_before - model.head.bias.numpy()
    # The labels of examples 1, 3, 5, 7 are 1 and 3: their biases fell least.
    assert max(step[1], step[3]) < min(step[0], step[2])
    np.testing.assert_allclose(step.sum(), lr * wd * bias_before.sum(), rtol=1e-4)
    assert not np.allclose(kernel_before, model.head.kernel.numpy())
