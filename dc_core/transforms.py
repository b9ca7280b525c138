"""Image transforms of docs/protocols.md §2 and §9, on single images inside tf.data.

All return float32 pixels in [0, 255]; mean/std normalisation and Sobel live inside the network,
so the exported SavedModel applies them too. The random ones are stateless: a view's seed fixes it.
"""

import math

import tensorflow as tf


def default_resize_size(image_size: int) -> int:
    """The feature-pass resize for a crop of `image_size` when none is given: the paper's
    256/224 ratio for ImageNet-sized crops; small images (Fashion-MNIST) are not upscaled."""
    return round(image_size * 256 / 224) if image_size >= 224 else image_size


def center_crop(image: tf.Tensor, resize_size: int, image_size: int) -> tf.Tensor:
    """Feature-pass view: resize the shorter side to `resize_size`, centre-crop `image_size`.

    Args:
      image: uint8 [H, W, C], or [B, H, W, C] for a batch of images of one size.
    Returns:
      float32 [image_size, image_size, C] (or [B, image_size, image_size, C]).
    """
    shape = tf.shape(image)
    h, w = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    scale = resize_size / tf.minimum(h, w)
    new_h = tf.maximum(image_size, tf.cast(tf.round(h * scale), tf.int32))
    new_w = tf.maximum(image_size, tf.cast(tf.round(w * scale), tf.int32))
    # An image already at the resize size (Fashion-MNIST, CIFAR) is only cast: resizing to the
    # same size is the identity, yet it made the input pipeline of a 60,000-image feature pass
    # take 2.6 s instead of 0.2 s, on the cores the network runs on (bench/RESULTS.md §8).
    same_size = tf.logical_and(tf.equal(new_h, shape[-3]), tf.equal(new_w, shape[-2]))
    resized = tf.cond(same_size, lambda: tf.cast(image, tf.float32),
                      lambda: tf.image.resize(image, [new_h, new_w], antialias=True))
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    return resized[..., top:top + image_size, left:left + image_size, :]


def random_resized_crop(image: tf.Tensor, image_size: int, scale: tuple, ratio: tuple,
                        seed: tf.Tensor, flip: bool = True) -> tf.Tensor:
    """Training view: a crop of random area fraction and aspect ratio, resized, randomly flipped.

    Stateless: the same seed gives the same view, whatever thread or order runs it.

    Args:
      image: uint8 [H, W, C].
      scale: (min, max) fraction of the image area (paper: 0.08, 1).
      ratio: (min, max) aspect ratio of the crop (paper: 3/4, 4/3).
      seed: int32 or int64 [2], the view's stateless seed.
    Returns:
      float32 [image_size, image_size, C].
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, size)
    out = tf.image.resize(crop, [image_size, image_size], antialias=True)
    return tf.image.stateless_random_flip_left_right(out, flip_seed) if flip else out


def color_distortion(image: tf.Tensor, strength: float, seed: tf.Tensor,
                     jitter_p: float = 0.8, grayscale_p: float = 0.2) -> tf.Tensor:
    """DeepCluster-v2's (SimCLR's) colour distortion of a training view, stateless.

    With probability `jitter_p`: brightness and contrast factors drawn from
    [1 - 0.8 s, 1 + 0.8 s], and for colour images saturation from the same range and a hue
    shift from [-0.2 s, 0.2 s], applied in that order (torchvision's ColorJitter(0.8 s, 0.8 s,
    0.8 s, 0.2 s), in a fixed order); then, for colour images, grayscale with probability
    `grayscale_p`. Contrast and saturation blend with the image's grayscale mean and grayscale,
    as torchvision's do.

    Args:
      image: float32 [H, W, C] pixels in [0, 255], C = 1 or 3.
      strength: s (swav: 1).
      seed: int32 or int64 [2], the view's stateless seed.
    Returns:
      float32 [H, W, C] in [0, 255].
    """
    seeds = tf.random.experimental.stateless_split(seed, 6)
    colour = image.shape[-1] == 3

    def factor(i, spread):
        return tf.random.stateless_uniform([], seeds[i], 1.0 - spread, 1.0 + spread)

    def gray(x):
        return tf.image.rgb_to_grayscale(x) if colour else x

    def jitter(x):
        x = tf.clip_by_value(x * factor(1, 0.8 * strength), 0.0, 255.0)
        mean = tf.reduce_mean(gray(x))
        x = tf.clip_by_value(mean + (x - mean) * factor(2, 0.8 * strength), 0.0, 255.0)
        if colour:
            g = gray(x)
            x = tf.clip_by_value(g + (x - g) * factor(3, 0.8 * strength), 0.0, 255.0)
            hue = tf.random.stateless_uniform([], seeds[4], -0.2 * strength, 0.2 * strength)
            x = tf.image.adjust_hue(x / 255.0, hue) * 255.0
        return x

    draws = tf.random.stateless_uniform([2], seeds[0])
    image = tf.cond(draws[0] < jitter_p, lambda: jitter(image), lambda: image)
    if colour:
        image = tf.cond(draws[1] < grayscale_p,
                        lambda: tf.image.grayscale_to_rgb(gray(image)), lambda: image)
    return image


def gaussian_blur(image: tf.Tensor, sigma: tuple, seed: tf.Tensor, p: float = 0.5) -> tf.Tensor:
    """With probability p, a Gaussian blur of standard deviation drawn from `sigma` (min, max)
    pixels (swav: 0.1-2 px at 224 px), as a separable convolution with reflected borders;
    stateless. image: float32 [H, W, C]."""
    draw_seed, sigma_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    s = tf.random.stateless_uniform([], sigma_seed, sigma[0], sigma[1])
    radius = max(1, int(math.ceil(3 * sigma[1])))
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / s))
    kernel /= tf.reduce_sum(kernel)
    channels = image.shape[-1]

    def blur(img):
        padded = tf.pad(img[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]],
                        mode="REFLECT")
        rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
        cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
        out = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
        return tf.nn.depthwise_conv2d(out, cols, [1, 1, 1, 1], "VALID")[0]

    return tf.cond(tf.random.stateless_uniform([], draw_seed) < p, lambda: blur(image),
                   lambda: image)
