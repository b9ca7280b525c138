"""Image sources: every example has a stable integer index, and images are decoded on demand.

A source yields `(index, payload, label)` triples in index order, where the payload is whatever is
cheap to carry before decoding (the index itself for random-access sources, the encoded bytes for
record files), and `decode(index, payload)` turns one into a uint8 [H, W, C] image. The balanced
sampler filters triples on their index and decodes only the accepted ones. Decoding may fail for
corrupt files: pipelines drop such elements with `ignore_errors()`, and the feature pass reports
the indices it never saw. Some files are refused before any pixel is decoded, and are skipped and
counted like corrupt ones:
  - a file that is no regular file (a FIFO, a device, a socket, a link to one of them or to
    nothing) is never read: reading a FIFO waits for a writer forever, and reading /dev/zero
    never ends; nor is a file above MAX_FILE_BYTES, which would be read whole into memory. Such
    a file found when its folder is listed is never opened; one that becomes such a file later
    (replaced while a run reads the folder) is opened without waiting and refused on what its
    open descriptor is, before a byte is read (`refusal`, `read_regular`);
  - an image whose header announces more than MAX_IMAGE_PIXELS (a decompression bomb or a scan
    of a poster would otherwise take gigabytes), in every format tf.io.decode_image opens: the
    JPEG, PNG, GIF, BMP and WebP headers are read, and JPEG XL, whose header is not, is refused.
Decoded images are cut to at most MAX_ASPECT_RATIO around their centre, so that the resizes of the
transforms stay bounded whatever the aspect ratio.

Sources:
  ArraySource   uint8 images in memory (Fashion-MNIST); random access.
  FolderSource  every JPEG/PNG/BMP/GIF below a folder, sorted by path; random access.
  TFDSSource    a TFDS dataset already prepared in a data dir; sequential record reads.
"""

import abc
import dataclasses
import os
import stat
from typing import ClassVar, Optional

import numpy as np
import tensorflow as tf

from dc_core import fileio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# PIL's decompression-bomb warning threshold (Image.MAX_IMAGE_PIXELS): about 9459 x 9459.
MAX_IMAGE_PIXELS = 89_478_485

# More than the file of any image within MAX_IMAGE_PIXELS takes (716 MB for a 16-bit RGBA PNG of
# incompressible pixels): a larger file (a sparse file, a disk image named .jpg) is not read.
MAX_FILE_BYTES = 1 << 30

# Longest side / shortest side of a decoded image. The feature pass resizes the shorter side to
# --resize_size, so its buffer grows with the aspect ratio: a 3 x 6000 image took 2.2 GB, a
# 1 x 80,000,000 one (below MAX_IMAGE_PIXELS) would take terabytes; resizing a training crop of a
# 1 x 4,000,000 strip took 11 GB. A longer image is cut to this ratio around its centre: the
# feature pass keeps only the centre anyway, and the training crops (aspect 3:4 to 4:3, at least
# 8 % of the area) still fit in a 10:1 image, which they stop doing beyond 16:1.
MAX_ASPECT_RATIO = 10


_SPECIAL_FILES = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISDIR, "a folder"))


def refusal(path, info: Optional[os.stat_result] = None) -> str:
    """Why the file at `path` (whose stat is `info`, when already known) is not to be read at
    all ("" when it is).

    An image is read whole, until the end of its file: on a FIFO that waits for a writer
    forever, on /dev/zero or /dev/urandom it never ends (tf.io.read_file's buffer grew by
    500 MB/s). So only regular files are read (links followed), and only up to MAX_FILE_BYTES.
    """
    if info is None:
        try:
            info = os.stat(path)
        except OSError as e:  # a link to nothing, a link loop
            return e.strerror
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(info.st_mode)), "special")
        return f"not a regular file but {kind}: never read, as reading it could wait forever"
    if info.st_size > MAX_FILE_BYTES:
        return (f"{info.st_size} bytes, above dc_core.sources.MAX_FILE_BYTES = "
                f"{MAX_FILE_BYTES}: not read, as it would be read whole into memory")
    return ""


def read_regular(path: bytes) -> tuple:
    """(the bytes of the file at `path`, b"") when it is a regular file of at most
    MAX_FILE_BYTES, else (b"", why not as bytes). The file is opened without waiting (O_NONBLOCK:
    a FIFO opens at once) and judged on its open descriptor, so a file replaced between the
    listing and the read is judged as what is read, and no read can wait or run without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:  # vanished, a dangling link, a socket, no permission
        return b"", f"{e.strerror}: {os.fsdecode(path)}".encode()
    reason = refusal(path, os.fstat(fd))
    if reason:
        os.close(fd)
        return b"", reason.encode()
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:  # it grew after the fstat
        return b"", (f"grew above dc_core.sources.MAX_FILE_BYTES = {MAX_FILE_BYTES} while "
                     "read: not read, as it would be read whole into memory").encode()
    return data, b""


def _require(condition: tf.Tensor, message: tf.Tensor) -> list:
    """Control dependencies that fail with `message` (a string tensor) unless `condition` holds.

    Eagerly (as `data.write_skipped` decodes a skipped image again to find why) the error is
    raised at once with `message` alone, so that skipped.tsv gets the reason without TF's
    decoration.
    """
    if tf.executing_eagerly():
        if not condition:
            raise tf.errors.InvalidArgumentError(None, None, message.numpy().decode())
        return []
    return [tf.debugging.Assert(condition, [message])]


def _gif_first_image(data: bytes) -> tuple:
    """(the GIF cut after its first image, that image's width x height).

    tf.io.decode_image reads every frame of a GIF and sizes its output to the largest one,
    whatever the logical screen of the header says, even when it returns the first frame only: a
    GIF announcing 8 x 8 whose second frame is 12000 x 12000 decoded to 432 MB. Decoding the
    blocks up to the end of the first image alone makes that image's descriptor the size
    decoding allocates. Finding that end takes a step per data sub-block (255 bytes): in Python
    through tf.numpy_function, as a TF while loop took 9 us a step (17 ms for a 480 KB GIF, four
    times its decoding; Python: 1.1 ms).
    """
    padded = data + bytes(16)  # the reads below stay in range at the end of the data

    def colour_table(flags):  # bytes of the colour table a flags byte announces
        return 6 << (flags & 7) if flags & 0x80 else 0

    def after_sub_blocks(at):  # sub-blocks of 1-255 bytes, each after its size, then a 0
        while at < len(data) and padded[at]:
            at += padded[at] + 1
        return at + 1

    at = 13 + colour_table(padded[10])
    while at < len(data):
        if padded[at] == 0x21:  # an extension: its label, then sub-blocks
            at = after_sub_blocks(at + 2)
        elif padded[at] == 0x2C:  # an image: descriptor, colour table, LZW code size, data
            pixels = (int.from_bytes(padded[at + 5:at + 7], "little")
                      * int.from_bytes(padded[at + 7:at + 9], "little"))
            end = after_sub_blocks(at + 11 + colour_table(padded[at + 9]))
            # An unfinished first image is left as it is: there is no frame after it.
            return (data[:end] + b";" if end <= len(data) else data), np.int64(pixels)
        else:  # the trailer, or garbage: no image for the decoder either
            break
    return data, np.int64(0)


def _read_header(data: tf.Tensor) -> tuple:
    """(the bytes to decode, the width x height (int64) decoding them allocates, why they are
    refused or ""). Reads only headers (and a GIF's block structure up to its first image), so it costs little
    next to decoding and refuses an oversized image before any pixel buffer is allocated.
    Formats are told by the magic numbers tf.io.decode_image goes by; data of any other format is
    refused here rather than left to a decoder whose size this does not read.
    """
    # 32 zero bytes of padding: the fixed-offset reads below stay in range for truncated files.
    head = tf.io.decode_raw(tf.strings.substr(
        tf.strings.join([tf.strings.substr(data, 0, 32), "\0" * 32]), 0, 32), tf.uint8)
    b = tf.cast(head, tf.int64)

    def big_endian32(i):
        return ((b[i] * 256 + b[i + 1]) * 256 + b[i + 2]) * 256 + b[i + 3]

    def little_endian(i, n):
        return sum(b[i + k] * 256 ** k for k in range(n))

    def starts_with(magic: bytes, at: int = 0):
        return tf.reduce_all(tf.equal(b[at:at + len(magic)], list(magic)))

    def accepted(pixels, decoded=data):
        return decoded, pixels, tf.constant("")

    def refused(reason):
        return data, tf.constant(0, tf.int64), tf.constant(reason)

    def bmp():
        height = little_endian(22, 4)  # signed: negative for top-down bitmaps
        height = tf.abs(tf.where(height >= 2 ** 31, height - 2 ** 32, height))
        return accepted(little_endian(18, 4) * height)

    def gif():
        first_image, pixels = tf.numpy_function(  # bytes in a graph, a 0-d array eagerly
            lambda x: _gif_first_image(x if isinstance(x, bytes) else x.item()), [data],
            [tf.string, tf.int64], stateful=False)
        return accepted(tf.ensure_shape(pixels, []), tf.ensure_shape(first_image, []))

    def webp():  # the canvas of an extended file, else the size of its only image
        lossless = little_endian(21, 4)
        return accepted(tf.where(
            starts_with(b"VP8X", 12), (little_endian(24, 3) + 1) * (little_endian(27, 3) + 1),
            tf.where(starts_with(b"VP8L", 12),
                     (lossless % 2 ** 14 + 1) * (lossless // 2 ** 14 % 2 ** 14 + 1),
                     little_endian(26, 2) % 2 ** 14 * (little_endian(28, 2) % 2 ** 14))))

    return tf.case([
        (starts_with(b"\xff\xd8\xff"), lambda: accepted(tf.reduce_prod(
            tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)))),
        (starts_with(b"\x89PNG\r\n\x1a\n"),
         lambda: accepted(big_endian32(16) * big_endian32(20))),
        (starts_with(b"GIF8"), gif),
        (starts_with(b"BM"), bmp),
        (starts_with(b"RIFF") & starts_with(b"WEBP", 8), webp),
        (starts_with(b"\xff\x0a") | starts_with(b"\0\0\0\x0cJXL \r\n\x87\n"),
         lambda: refused("JPEG XL: refused, as its header is not read to check its size against "
                         "dc_core.sources.MAX_IMAGE_PIXELS (convert the file to PNG or JPEG)")),
        (tf.equal(tf.strings.length(data), 0), lambda: refused("the file is empty")),
    ], default=lambda: refused("Unknown image file format: not a JPEG, PNG, GIF, BMP or WebP file"))


def decode_checked(data: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 [H, W, channels] of an encoded image (the first frame of an animation), refusing
    formats whose header is not read and images above MAX_IMAGE_PIXELS with an error that says
    so, and cut to MAX_ASPECT_RATIO around its centre."""
    data, pixels, refusal = _read_header(data)
    checks = _require(tf.equal(refusal, ""), refusal) + _require(
        pixels <= MAX_IMAGE_PIXELS, tf.strings.format(
            "the image header announces {} pixels, above dc_core.sources.MAX_IMAGE_PIXELS = "
            f"{MAX_IMAGE_PIXELS}; refused to protect memory (downscale the file)", pixels))
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False,
                                   dtype=tf.uint8)
    shape = tf.shape(image)
    longest = tf.minimum(shape[0], shape[1]) * MAX_ASPECT_RATIO
    height, width = tf.minimum(shape[0], longest), tf.minimum(shape[1], longest)
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    image = image[top:top + height, left:left + width]
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
      class_names: the name of each label (label i is class_names[i]) when the data set has them.
      decodes_batches: whether `decode` also takes a vector of indices (images of one size that
        cannot fail to decode), so a pipeline may batch before decoding.
    """
    name: str
    num_examples: int
    channels: int
    labels: Optional[np.ndarray]
    random_access: bool = True
    class_names: Optional[tuple] = None
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
    in one.

    Attributes:
      paths: each example's path relative to root as os.walk names it: bytes of a name that are
        not UTF-8 as surrogate escapes, which os.fsencode turns back into the name.
      refusals: for each path, why the file is never read ("" for those that are), found when
        the folder was listed.
    """
    root: str = ""
    paths: tuple = ()
    refusals: tuple = ()

    def __post_init__(self):
        self._paths = tf.constant([os.fsencode(os.path.join(self.root, p)) for p in self.paths])
        self._refusals = tf.constant(self.refusals or ("",) * len(self.paths))

    def decode(self, index, payload):
        del payload
        listed = tf.gather(self._refusals, index)
        # A file refused when listed is never opened: the read waits for the check.
        with tf.control_dependencies(_require(tf.equal(listed, ""), listed)):
            data, reason = tf.numpy_function(lambda path: read_regular(np.asarray(path).item()),
                                             [tf.gather(self._paths, index)],
                                             [tf.string, tf.string])
        data.set_shape([])
        reason.set_shape([])
        with tf.control_dependencies(_require(tf.equal(reason, ""), reason)):
            return decode_checked(tf.identity(data), 3)

    def describe(self, index):
        return fileio.printable(self.paths[index])


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


def load_idx(path: str, count: int = 0) -> np.ndarray:
    """Reads an IDX file (gzipped or not), the format of MNIST and Fashion-MNIST: every record,
    or the first `count` (count > 0), of which only those are read (and decompressed)."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\x00\x00" or magic[2] != 0x08:
            raise ValueError(f"{path} is not an unsigned-byte IDX file")
        dims = f.read(4 * magic[3])
        if len(dims) < 4 * magic[3]:
            raise ValueError(f"{path} is truncated inside its header")
        shape = tuple(int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4))
        if count and shape and count < shape[0]:
            shape = (count, *shape[1:])
        array = np.frombuffer(f.read(int(np.prod(shape))), np.uint8)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)
