"""Filter visualisation by gradient ascent on the input image (docs/protocols.md §7).

For channel c of a layer, from pixel noise N(128, 20²), `steps` times:

    objective(z) = log_softmax_over_channels(spatial mean of a(z))[c] - 1e-5 · ||z||²
    z <- z + lr · g / (||g|| + 1e-8),   g = d objective / d z   (each image's own gradient norm)
    every 5th step, the first included: z <- Gaussian blur of z, σ = 0.3 px per spatial axis

where a is the post-ReLU output of the layer (for a fully connected layer, its units without the
spatial mean); lr is 3, and 30 for conv5. The result is shown as deepcluster's
visu/gradient_ascent.py shows it (`deprocess`).

z is what the released code optimises: the network's input after mean/std normalisation (its
networks take normalised images; dc_tf's normalise inside, layer "normalize"), at the run's size
and channels (224x224x3 for the paper's networks, 32x32x1 for Fashion-MNIST). In raw [0, 255]
pixels the same decay and step would be 255·std times stronger than the objective's gradient and
only darken the image. The initial noise is N(128, 20²) in pixels, normalised. The released code
also switches to the pre-ReLU map of a channel that is dead on the current image (docs/protocols.md
§7); this does not: the log-softmax still moves such an image by lowering the other channels.
Channels are optimised together as one batch; batch normalisation runs in inference mode, so
every image's gradient is its own.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from scipy import ndimage

from dc_tf.visualization.trained import Progress

STEPS = 1000
WEIGHT_DECAY = 1e-5
BLUR_SIGMA = 0.3
BLUR_EVERY = 5
NOISE_MEAN, NOISE_STD = 128.0, 20.0


def default_learning_rate(layer: str) -> float:
    """docs/protocols.md §7: 3, and 30 for conv5 (whose averaged activation moves more slowly)."""
    return 30.0 if layer == "conv5" else 3.0


def initial_images(n: int, size: int, channels: int, seed: int) -> np.ndarray:
    """float32 [n, size, size, channels] pixel noise N(128, 20²): where `ascend` starts."""
    rng = np.random.default_rng(seed)
    return rng.normal(NOISE_MEAN, NOISE_STD, (n, size, size, channels)).astype(np.float32)


def deprocess(x: np.ndarray) -> np.ndarray:
    """float [N, H, W, C] -> uint8: per image, centred, scaled to std 0.1, shifted to 0.5,
    clipped to [0, 1] and scaled to 255 (the released code's display)."""
    axes = tuple(range(1, x.ndim))
    y = x - x.mean(axis=axes, keepdims=True)
    y = y / (y.std(axis=axes, keepdims=True) + 1e-5) * 0.1 + 0.5
    return (np.clip(y, 0.0, 1.0) * 255).astype(np.uint8)


def channel_objective(activations: tf.Tensor, channels: tf.Tensor) -> tf.Tensor:
    """float32 [n]: log-softmax over channels of the (spatially averaged) activations of image
    i, at channel channels[i]. activations: [n, h, w, C] or [n, C]; channels: int32 [n]."""
    if activations.shape.rank == 4:
        activations = tf.reduce_mean(activations, axis=[1, 2])
    return tf.gather(tf.nn.log_softmax(activations, axis=-1), channels, batch_dims=1)


@dataclasses.dataclass
class AscentResult:
    """images: float32 [n, S, S, C] the optimised inputs in pixels (about [0, 255], not clipped);
    start, end: float32 [n] the channel objective (without the decay) before and after."""
    images: np.ndarray
    start: np.ndarray
    end: np.ndarray


def ascend(backbone: keras.Model, layer: str, channels, steps: int = STEPS,
           learning_rate: float = 3.0, seed: int = 0, weight_decay: float = WEIGHT_DECAY,
           blur_sigma: float = BLUR_SIGMA, blur_every: int = BLUR_EVERY) -> AscentResult:
    """Gradient ascent for each of `channels` (ints) of the endpoint `layer` of `backbone`."""
    channels = np.asarray(channels, np.int32)
    _, size, _, num_channels = backbone.input.shape
    normalize = backbone.get_layer("normalize")
    mean, std = (np.asarray(v, np.float32) for v in (normalize.mean, normalize.std))
    z = (initial_images(len(channels), size, num_channels, seed) / 255.0 - mean) / std
    net = keras.Model(backbone.input, backbone.output[layer])
    targets = tf.constant(channels)
    spec = tf.TensorSpec(z.shape, tf.float32)

    def pixels(normalized):
        return (normalized * std + mean) * 255.0

    @tf.function(input_signature=[spec])
    def objective(normalized):
        return channel_objective(net(pixels(normalized), training=False), targets)

    @tf.function(input_signature=[spec])
    def step(normalized):
        with tf.GradientTape() as tape:
            tape.watch(normalized)
            # Summed over the batch: each image's gradient is that of its own objective.
            total = tf.reduce_sum(objective(normalized)) - weight_decay * tf.reduce_sum(
                tf.square(normalized))
        g = tape.gradient(total, normalized)
        norm = tf.sqrt(tf.reduce_sum(tf.square(g), axis=[1, 2, 3], keepdims=True))
        return normalized + learning_rate * g / (norm + 1e-8)

    start = objective(z).numpy()
    progress = Progress(f"gradient ascent on {layer} ({len(channels)} channels)", steps, "steps")
    z = tf.constant(z)
    for it in range(steps):
        z = step(z)
        if it % blur_every == 0:
            z = tf.constant(ndimage.gaussian_filter(z.numpy(), (0, blur_sigma, blur_sigma, 0)))
        progress.update(1)
    return AscentResult(pixels(z.numpy()), start, objective(z).numpy())
