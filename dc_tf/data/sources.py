"""Image sources: every example has a stable integer index, and images are decoded on demand.

A source yields `(index, payload, label)` triples in index order, where the payload is whatever is
cheap to carry before decoding (the index itself for random-access sources, the encoded bytes for
record files), and `decode(index, payload)` turns one into a uint8 [H, W, C] image. The balanced
sampler filters triples on their index and decodes only the accepted ones. Decoding may fail for
corrupt files: pipelines drop such elements with `ignore_errors()`, and the feature pass reports
the indices it never saw. Encoded images whose header announces more than MAX_IMAGE_PIXELS are
refused before decoding (a decompression bomb or a scan of a poster would otherwise take
gigabytes); they are skipped and counted like corrupt files.

Sources:
  ArraySource   uint8 images in memory (Fashion-MNIST); random access.
  FolderSource  every JPEG/PNG/BMP/GIF below a folder, sorted by path; random access.
  TFDSSource    a TFDS dataset already prepared in a data dir; sequential record reads.
"""

import abc
import dataclasses
import os
from typing import ClassVar, Optional

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# PIL's decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS): about 9459 x 9459.
MAX_IMAGE_PIXELS = 89_478_485


def header_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width x height (int64) announced by a JPEG, PNG, GIF or BMP header; 0 for other data.

    Reads only the header (the JPEG start-of-frame for JPEGs), so it costs nothing next to
    decoding and can refuse an oversized image before any pixel buffer is allocated.
    """
    # 32 zero bytes of padding: the fixed-offset reads below stay in range for truncated files.
    head = tf.io.decode_raw(tf.strings.substr(
        tf.strings.join([tf.strings.substr(data, 0, 32), "\0" * 32]), 0, 32), tf.uint8)
    b = tf.cast(head, tf.int64)

    def big_endian32(i):
        return ((b[i] * 256 + b[i + 1]) * 256 + b[i + 2]) * 256 + b[i + 3]

    def little_endian(i, n):
        return sum(b[i + k] * 256 ** k for k in range(n))

    def starts_with(magic: bytes):
        return tf.reduce_all(tf.equal(b[:len(magic)], list(magic)))

    def jpeg():
        return tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64))

    def other():
        bmp_height = little_endian(22, 4)  # signed: negative for top-down bitmaps
        bmp_height = tf.abs(tf.where(bmp_height >= 2 ** 31, bmp_height - 2 ** 32, bmp_height))
        png = big_endian32(16) * big_endian32(20)
        gif = little_endian(6, 2) * little_endian(8, 2)
        bmp = little_endian(18, 4) * bmp_height
        return tf.case([(starts_with(b"\x89PNG\r\n\x1a\n"), lambda: png),
                        (starts_with(b"GIF8"), lambda: gif), (starts_with(b"BM"), lambda: bmp)],
                       default=lambda: tf.constant(0, tf.int64))
    return tf.cond(starts_with(b"\xff\xd8\xff"), jpeg, other)


def decode_checked(data: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 [H, W, channels] of an encoded image (the first frame of an animation), refusing
    images above MAX_IMAGE_PIXELS with an error that says so."""
    pixels = header_pixels(data)
    check = tf.debugging.Assert(pixels <= MAX_IMAGE_PIXELS, [
        "the image header announces", pixels, "pixels, above dc_tf.data.sources.MAX_IMAGE_PIXELS "
        f"= {MAX_IMAGE_PIXELS}; refused to protect memory (downscale the file)"])
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False,
                                   dtype=tf.uint8)
    image.set_shape([None, None, channels])
    return image


@dataclasses.dataclass
class Source(abc.ABC):
    """Base class: a named, indexed collection of images.

    Attributes:
      name: the --dataset value it was opened from.
      num_examples: N; indices are 0 .. N-1.
      channels: C of every decoded image (1 or 3).
      labels: int64 [N] ground-truth labels for monitoring, -1 where unknown; None when the
        labels are only learnt while reading (record sources fill them in the feature pass).
      random_access: whether `decode` can read any index without reading the others.
      decodes_batches: whether `decode` also takes a vector of indices (images of one size that
        cannot fail to decode), so a pipeline may batch before decoding.
    """
    name: str
    num_examples: int
    channels: int
    labels: Optional[np.ndarray]
    random_access: bool = True
    decodes_batches: ClassVar[bool] = False

    def triples(self, order: Optional[np.ndarray] = None,
                batch_size: Optional[int] = None) -> tf.data.Dataset:
        """(index int64, payload, label int64) for every example, in `order` or index order;
        with `batch_size`, vectors of that many (the last one shorter)."""
        indices = np.arange(self.num_examples) if order is None else np.asarray(order)
        labels = (tf.constant(self.labels, tf.int64) if self.labels is not None
                  else tf.fill([self.num_examples], tf.constant(-1, tf.int64)))
        ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        if batch_size:
            ds = ds.batch(batch_size)
        return ds.map(lambda i: (i, i, tf.gather(labels, i)))

    @abc.abstractmethod
    def decode(self, index: tf.Tensor, payload: tf.Tensor) -> tf.Tensor:
        """The uint8 [H, W, C] image of one (index, payload) pair; may fail for corrupt files."""

    def describe(self, index: int) -> str:
        """Where example `index` comes from, for messages and the index map."""
        return f"{self.name}[{index}]"


@dataclasses.dataclass
class ArraySource(Source):
    """Images held in memory as uint8 [N, H, W, C]; `decode` also takes a vector of indices."""
    images: np.ndarray = None
    decodes_batches: ClassVar[bool] = True

    def __post_init__(self):
        self._images = tf.constant(self.images)

    def decode(self, index, payload):
        del payload
        return tf.gather(self._images, index)


@dataclasses.dataclass
class FolderSource(Source):
    """Every image file below `root`; first-level sub-folders are the classes when all files sit
    in one."""
    root: str = ""
    paths: tuple = ()

    def __post_init__(self):
        self._paths = tf.constant([os.path.join(self.root, p) for p in self.paths])

    def decode(self, index, payload):
        del payload
        return decode_checked(tf.io.read_file(tf.gather(self._paths, index)), 3)

    def describe(self, index):
        return self.paths[index]


@dataclasses.dataclass
class TFDSSource(Source):
    """A prepared TFDS split read record by record, in the stable order of its files.

    Random access into TFRecord files is not available, so the sampler streams every record's
    *encoded* bytes each pass and decodes only the accepted ones: the cost of rejection is I/O of
    the rejected records, never their decoding or augmentation.
    """
    builder: object = None
    split: str = "train"
    image_key: str = "image"
    label_key: Optional[str] = "label"

    def triples(self, order=None, batch_size=None):
        if order is not None:
            raise ValueError(f"{self.name} is read sequentially; it has no random order")
        import tensorflow_datasets as tfds  # only record sources need TFDS at run time
        ds = self.builder.as_dataset(split=self.split, shuffle_files=False,
                                     decoders={self.image_key: tfds.decode.SkipDecoding()})
        label_key = self.label_key

        def unpack(i, ex):
            label = tf.cast(ex[label_key], tf.int64) if label_key else tf.constant(-1, tf.int64)
            return i, ex[self.image_key], label
        ds = ds.enumerate().map(unpack)
        return ds.batch(batch_size) if batch_size else ds

    def decode(self, index, payload):
        del index
        return decode_checked(payload, self.channels)


def load_idx(path: str) -> np.ndarray:
    """Reads an IDX file (gzipped or not), the format of MNIST and Fashion-MNIST."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)
