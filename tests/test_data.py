"""Sources and transforms on real file formats: IDX, image folders, TFDS-prepared datasets."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image
from dc_core import sources, transforms
from dc_core.sources import ArraySource
from dc_tf import data
from dc_tf.data import pipelines


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files_is_padded_to_32(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (7, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7) % 3)
    source = data.open_source("fashion_mnist", str(tmp_path), max_examples=5)
    assert (source.num_examples, source.channels) == (5, 1)
    assert source.images.shape == (5, 32, 32, 1)
    np.testing.assert_array_equal(source.images[:, 2:30, 2:30, 0], images[:5])
    assert source.images[:, :2].sum() == 0
    np.testing.assert_array_equal(source.labels, [0, 1, 2, 0, 1])


@pytest.mark.skipif(not os.path.exists(data.FASHION_MNIST_DIR), reason="needs the Debian package")
def test_fashion_mnist_debian_package_has_60000_training_images():
    source = data.open_source("fashion_mnist")
    assert source.images.shape == (60000, 32, 32, 1)
    assert np.bincount(source.labels).tolist() == [6000] * 10


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        sources.load_idx(str(path))


@pytest.mark.parametrize("name", ["x.gz", "x"])
def test_an_idx_file_reads_whole_or_its_first_records(tmp_path, name):
    array = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2)
    path = str(tmp_path / name)
    with (gzip.open if name.endswith(".gz") else open)(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
                + array.tobytes())
    np.testing.assert_array_equal(sources.load_idx(path), array)
    np.testing.assert_array_equal(sources.load_idx(path, 2), array[:2])
    np.testing.assert_array_equal(sources.load_idx(path, 9), array)  # more than it holds: all
    header_cut = bytes([0, 0, 8, 3, 0, 0])  # 3 sizes announced, half of one written
    with open(path, "wb") as f:
        f.write(gzip.compress(header_cut) if name.endswith(".gz") else header_cut)
    with pytest.raises(ValueError, match="truncated inside its header"):
        sources.load_idx(path)


def _mixed_folder(root):
    """Two classes, every supported format and colour mode, and three unreadable files."""
    write_image(f"{root}/cat/a.jpg", (50, 40), "RGB")
    write_image(f"{root}/cat/b.png", (20, 64), "RGBA")
    write_image(f"{root}/cat/c.png", (33, 33), "I;16")
    write_image(f"{root}/dog/d.bmp", (40, 40), "L")
    write_image(f"{root}/dog/e.gif", (30, 45), "RGB")
    write_image(f"{root}/dog/f.jpg", (64, 48), "CMYK", fmt="JPEG")
    open(f"{root}/dog/empty.jpg", "wb").close()
    with open(f"{root}/dog/notes.jpg", "w") as f:
        f.write("not an image")
    good = open(f"{root}/cat/a.jpg", "rb").read()
    with open(f"{root}/cat/truncated.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + good[10:60])
    with open(f"{root}/dog/readme.txt", "w") as f:
        f.write("ignored: not an image extension")


def test_folder_source_decodes_every_format_and_skips_broken_files(tmp_path):
    _mixed_folder(tmp_path)
    source = data.open_source(f"folder:{tmp_path}")
    assert source.num_examples == 9 and source.channels == 3
    assert source.describe(0) == os.path.join("cat", "a.jpg")
    np.testing.assert_array_equal(source.labels, [0, 0, 0, 0, 1, 1, 1, 1, 1])
    batches = list(pipelines.feature_dataset(source, 36, 32, batch_size=4))
    seen = np.concatenate([b[1].numpy() for b in batches])
    images = np.concatenate([b[0].numpy() for b in batches])
    broken = {source.paths.index(p) for p in (os.path.join("cat", "truncated.png"),
                                               os.path.join("dog", "empty.jpg"),
                                               os.path.join("dog", "notes.jpg"))}
    assert set(seen) == set(range(9)) - broken
    assert images.shape == (6, 32, 32, 3) and np.isfinite(images).all()
    assert images.max() <= 255.0 and images.max() > 1.0


def test_folder_without_class_folders_has_no_labels(tmp_path):
    write_image(f"{tmp_path}/x.jpg")
    write_image(f"{tmp_path}/sub/y.jpg")
    assert data.open_source(f"folder:{tmp_path}").labels is None


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
    import tensorflow_datasets as tfds
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 24, 20, 3), dtype=np.uint8)
    split = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(12) % 4})
    tfds.dataset_builders.store_as_tfds_dataset(
        name="dc_tf_tiny", version="1.0.0", data_dir=str(tmp_path), split_datasets={"train": split},
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(24, 20, 3)),
                                             "label": tfds.features.ClassLabel(num_classes=4)}))
    source = data.open_source("tfds:dc_tf_tiny", str(tmp_path), max_examples=10)
    assert (source.num_examples, source.channels, source.random_access) == (10, 3, False)
    (x, idx, labels), = list(pipelines.feature_dataset(source, 24, 16, batch_size=16))
    np.testing.assert_array_equal(idx, np.arange(10))
    np.testing.assert_array_equal(labels, np.arange(10) % 4)
    assert x.shape == (10, 16, 16, 3)
    # Index i is the i-th stored record: its centre crop matches image i.
    np.testing.assert_allclose(x[3], transforms.center_crop(images[3], 24, 16), atol=1e-3)


def test_missing_datasets_say_where_they_looked_and_how_to_get_them(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.open_source("fashion_mnist", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match="no such folder"):
        data.open_source(f"folder:{tmp_path}/nothing")
    with pytest.raises(data.DatasetNotFoundError, match="tfds build imagenet2012"):
        data.open_source("tfds:imagenet2012", str(tmp_path))
    with pytest.raises(ValueError, match="--dataset=mnist"):
        data.open_source("mnist")


@pytest.mark.parametrize("shape", [(40, 60, 3), (64, 30, 1)])
def test_transforms_give_the_requested_size_eagerly_and_in_tf_data(shape):
    image = tf.constant(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8))
    crop = transforms.center_crop(image, 36, 32)
    assert crop.shape == (32, 32, shape[2]) and crop.dtype == tf.float32
    view = transforms.random_resized_crop(image, 24, (0.08, 1.0), (0.75, 1.33), seed=[1, 2])
    assert view.shape == (24, 24, shape[2])
    # Stateless: the same seed gives the same view, eagerly and inside tf.data.
    same = tf.data.Dataset.from_tensors(image).map(lambda x: transforms.random_resized_crop(
        x, 24, (0.08, 1.0), (0.75, 1.33), seed=[1, 2]))
    np.testing.assert_array_equal(next(iter(same)).numpy(), view.numpy())
    ds = tf.data.Dataset.from_tensors(image).map(lambda x: transforms.center_crop(x, 36, 32))
    np.testing.assert_allclose(next(iter(ds)).numpy(), crop.numpy(), atol=1e-4)


@pytest.mark.parametrize("shape", [(32, 32, 1), (32, 48, 3), (4, 32, 32, 1)])
def test_center_crop_of_an_image_already_at_the_resize_size_only_crops(shape):
    image = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
    out = transforms.center_crop(tf.constant(image), 32, 32).numpy()
    left = (shape[-2] - 32) // 2
    np.testing.assert_array_equal(out, image[..., left:left + 32, :].astype(np.float32))


def test_folder_source_handles_links_odd_names_animations_and_tiny_images(tmp_path):
    from PIL import Image
    write_image(f"{tmp_path}/a/ünïcode 図.png", (30, 30), "RGB")
    write_image(f"{tmp_path}/a/one_pixel.png", (1, 1), "L")
    frames = [Image.new("RGB", (20, 20), (i * 60, 0, 0)) for i in range(3)]
    frames[0].save(f"{tmp_path}/a/animated.gif", save_all=True, append_images=frames[1:])
    os.symlink(tmp_path, f"{tmp_path}/a/loop")      # a symlink loop
    os.symlink(f"{tmp_path}/a", f"{tmp_path}/b")    # the same folder twice
    source = data.open_source(f"folder:{tmp_path}")
    assert sorted(source.paths) == sorted(os.path.join("a", n) for n in (
        "ünïcode 図.png", "one_pixel.png", "animated.gif"))
    (x, idx, _), = list(pipelines.feature_dataset(source, 36, 32, batch_size=8))
    assert sorted(idx.numpy()) == [0, 1, 2] and x.shape == (3, 32, 32, 3)
    gif = x[list(idx.numpy()).index(source.paths.index(os.path.join("a", "animated.gif")))]
    assert float(tf.reduce_mean(gif[..., 0])) < 1.0  # the first frame (red = 0), not a later one


def test_in_memory_feature_batches_match_decoding_one_image_at_a_time():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (10, 30, 40, 1), dtype=np.uint8)
    source = ArraySource("arrays", 10, 1, np.arange(10) % 3, images=images)
    order = rng.permutation(10)
    batches = list(pipelines.feature_dataset(source, 34, 32, batch_size=4, order=order))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    x, idx, labels = (np.concatenate([b[i].numpy() for b in batches]) for i in range(3))
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(labels, order % 3)
    for image, i in zip(x, idx):
        np.testing.assert_allclose(image, transforms.center_crop(images[i], 34, 32), atol=1e-3)
