"""The paper's flagfiles run unchanged on a folder of JPEGs (only the data and sizes overridden),
and PIC trains in place of k-means."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import config_from_flagfile, write_image
from dc_tf import train


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    for i in range(12):
        write_image(f"{root}/class{i % 2}/{i:03d}.jpg", (60 + 7 * i, 50 + 3 * i), "RGB", seed=i)
    return root


@pytest.mark.parametrize("flagfile, overrides, endpoints", [
    ("alexnet.cfg", [], {"conv1": (55, 55, 96), "conv5": (13, 13, 256), "fc7": (4096,)}),
    ("resnet50.cfg", ["--image_size=64", "--resize_size=72"],
     {"conv2": (16, 16, 256), "conv5": (2, 2, 2048), "pool": (2048,)}),
])
def test_paper_flagfile_trains_and_exports(jpeg_folder, tmp_path, flagfile, overrides, endpoints):
    cfg = config_from_flagfile(
        flagfile, f"--dataset=folder:{jpeg_folder}", f"--model_dir={tmp_path}/run",
        "--num_clusters=3", "--pca_dim=8", "--batch_size=4", "--epochs=1", *overrides)
    assert cfg.sobel and cfg.learning_rate == 0.05 and cfg.weight_decay == 1e-5
    cfg = train.run(cfg)
    row = json.loads(open(f"{cfg.model_dir}/metrics.jsonl").readline())
    assert np.isfinite(row["loss"]) and row["nmi_labels"] is not None
    serve = tf.saved_model.load(f"{cfg.model_dir}/export").signatures["serving_default"]
    images = np.zeros((2, cfg.image_size, cfg.image_size, 3), np.uint8)
    out = serve(images=tf.constant(images))
    for name, shape in endpoints.items():
        assert tuple(out[name].shape[1:]) == shape, name


def test_pic_clustering_trains(smoke_config):
    cfg = train.run(smoke_config("--clustering=pic", "--epochs=2"))
    rows = [json.loads(line) for line in open(os.path.join(cfg.model_dir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [0, 1]
    labels = np.load(os.path.join(cfg.model_dir, "assignments", "epoch_0001.npy"))
    assert 2 <= len(np.unique(labels)) <= cfg.num_clusters
    assert rows[0]["kmeans_loss"] is None  # PIC has no k-means objective


def test_baselines_random_export_and_supervised_training(smoke_config):
    from dc_tf import data
    random = train.run(smoke_config("--epochs=0"))
    assert os.path.exists(os.path.join(random.model_dir, "export", "saved_model.pb"))
    assert not os.path.exists(os.path.join(random.model_dir, "metrics.jsonl"))

    cfg = smoke_config("--supervised", "--epochs=1", "--num_clusters=3")
    cfg = train.run(dataclasses.replace(cfg, model_dir=cfg.model_dir + "_supervised"))
    assert cfg.num_clusters == 10  # one output per Fashion-MNIST class, --num_clusters ignored
    row = json.loads(open(os.path.join(cfg.model_dir, "metrics.jsonl")).readline())
    assert row["nmi_labels"] is None and np.isfinite(row["loss"])
    labels = np.load(os.path.join(cfg.model_dir, "assignments", "epoch_0000.npy"))
    np.testing.assert_array_equal(labels, data.open_source("fashion_mnist", "", 512).labels)


def test_resnet50_v2_flagfile_trains_and_exports(jpeg_folder, tmp_path):
    """The ImageNet DeepCluster-v2 recipe unchanged but for the data, sizes and one device:
    colour crops with every distortion, local crops of another size, LARC, the warm-up and
    cosine, bfloat16."""
    cfg = config_from_flagfile(
        "resnet50_v2.cfg", f"--dataset=folder:{jpeg_folder}", f"--model_dir={tmp_path}/run",
        "--strategy=default", "--image_size=64", "--resize_size=72", "--local_crop_size=32",
        "--local_crops=2", "--num_prototypes=3,4", "--projection_dims=32,8", "--batch_size=4",
        "--epochs=2", "--warmup_epochs=1", "--learning_rate=0.5", "--final_learning_rate=0.005")
    assert cfg.lars and cfg.blur and cfg.color_jitter == 1.0 and cfg.mixed_precision
    cfg = train.run(cfg)
    rows = [json.loads(line) for line in open(f"{cfg.model_dir}/metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # 3 steps per epoch: the rate at the end of epoch 0 is the peak, at the end the final one.
    np.testing.assert_allclose([r["learning_rate"] for r in rows], [0.5, 0.005], rtol=1e-4)
    serve = tf.saved_model.load(f"{cfg.model_dir}/export").signatures["serving_default"]
    out = serve(images=tf.zeros((2, 64, 64, 3), tf.uint8))
    assert tuple(out["pool"].shape[1:]) == (2048,) and tuple(out["embedding"].shape[1:]) == (8,)
