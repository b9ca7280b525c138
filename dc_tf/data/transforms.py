"""Image transforms of docs/protocols.md §2, on single uint8 [H, W, C] images inside tf.data.

Both return float32 pixels in [0, 255]; mean/std normalisation and Sobel live inside the network,
so the exported SavedModel applies them too.
"""

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
