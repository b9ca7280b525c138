"""dc_tf.visualize and dc_tf.visualization: montages, gradient ascent, top images, the cluster
montage logged during a real fit(), and projector files read back by TensorBoard's own plugin."""

import glob
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, config_from_flagfile
from dc_tf.visualization import activations, cluster_montage, montage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real epoch of the smoke run (512 Fashion-MNIST images, k=10), with the callback."""
    from dc_tf import train
    model_dir = tmp_path_factory.mktemp("viz") / "run"
    return train.run(config_from_flagfile("smoke.cfg", f"--model_dir={model_dir}", "--epochs=1"))


def _images_in_events(logdir):
    """{(tag, step): [uint8 arrays]} of every image summary in logdir's event files."""
    import tensorflow as tf
    found = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    pngs = value.tensor.string_val[2:]  # width, height, then the images
                    found[(value.tag, event.step)] = [np.asarray(Image.open(io.BytesIO(p)))
                                                      for p in pngs]
    return found


def _visualize(command, model_dir, out, **fields):
    from dc_tf.visualization import commands
    return commands.run(commands.VisualizeConfig(command, str(model_dir), output_dir=str(out),
                                                 logdir=str(out / "logs"), **fields))


# ------------------------------------------------------------------------------ pure numpy

def test_deprocess_matches_the_released_display_by_hand():
    x = np.array([0.0, 2.0, 4.0, 6.0]).reshape(1, 2, 2, 1)
    # mean 3, std sqrt(5): (x - 3) / 2.23607 * 0.1 + 0.5 -> 0.3658, 0.4553, 0.5447, 0.6342 (x255)
    from dc_tf.visualization import ascent
    assert ascent.deprocess(x).ravel().tolist() == [93, 116, 138, 161]
    assert ascent.deprocess(x + 100).ravel().tolist() == [93, 116, 138, 161]  # per image


def test_grid_places_cells_row_by_row_with_padding():
    images = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3, 1)
    out = montage.grid(images, columns=3, pad=2)
    assert out.shape == (2 * (4 + 2) + 2, 3 * (3 + 2) + 2, 1)
    np.testing.assert_array_equal(out[2:6, 2:5], images[0])
    np.testing.assert_array_equal(out[8:12, 7:10], images[4])  # row 1, column 1
    assert (out[8:12, 12:15] == montage.BACKGROUND).all()  # the sixth cell stays empty
    assert montage.grid(images, columns=3, pad=0, cells=9).shape == (12, 9, 1)
    big = montage.enlarge(images, 7)  # 4 px -> factor 2
    np.testing.assert_array_equal(big[1, :, :, 0], np.kron(images[1, :, :, 0], np.ones((2, 2))))
    captioned = montage.caption(out, "x")
    assert captioned.shape == (out.shape[0] + montage.CAPTION_HEIGHT, out.shape[1], 3)
    assert (captioned[montage.CAPTION_HEIGHT:, :, 0] == out[..., 0]).all()


def test_streaming_top_k_equals_a_full_sort_with_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, (100, 4)).astype(np.float32)  # many ties
    best = activations.TopK(4, 9)
    for start in range(0, 100, 13):
        best.update(scores[start:start + 13], np.arange(start, min(start + 13, 100)))
    indices, top = best.result()
    for c in range(4):
        expected = np.lexsort((np.arange(100), -scores[:, c]))[:9]
        np.testing.assert_array_equal(indices[c], expected)
        np.testing.assert_array_equal(top[c], scores[expected, c])


def test_pick_clusters_is_seeded_and_respects_members_and_prefix():
    assignment = np.array([0, 0, 1, 1, 1, 2, -1, 2, 3, 3], np.int32)
    picks = cluster_montage.pick_clusters(assignment, 3, 2, seed=(31, 4))
    again = cluster_montage.pick_clusters(assignment, 3, 2, seed=(31, 4))
    assert [(c, m.tolist()) for c, m in picks] == [(c, m.tolist()) for c, m in again]
    assert len(picks) == 3 and [c for c, _ in picks] == sorted(c for c, _ in picks)
    for c, members in picks:
        assert 1 <= len(members) <= 2 and (assignment[members] == c).all()
    prefix = cluster_montage.pick_clusters(assignment, 5, 8, seed=0, candidates=4)
    assert [(c, m.tolist()) for c, m in prefix] == [(0, [0, 1]), (1, [2, 3])]


# ------------------------------------------------------------------------------ gradient ascent

def test_gradient_ascent_raises_the_chosen_channels_activation():
    from dc_tf import models
    from dc_tf.visualization import ascent
    backbone = models.build_backbone("small_vgg", 16, 1, False, (0.3,), (0.35,), seed=3)
    channels = [0, 7, 30]
    result = ascent.ascend(backbone, "conv2", channels, steps=30, learning_rate=3.0, seed=1)
    before = backbone(ascent.initial_images(3, 16, 1, seed=1))["conv2"].numpy().mean((1, 2))
    after = backbone(result.images)["conv2"].numpy().mean((1, 2))
    rows = np.arange(3)
    assert (result.end > result.start).all(), (result.start, result.end)
    assert (after[rows, channels] > before[rows, channels]).all(), (before, after)
    # The step rule: without blur and decay, one step moves each image by exactly lr in the
    # normalised input, i.e. by lr * 255 * std in pixels.
    one = ascent.ascend(backbone, "conv2", channels, steps=1, learning_rate=2.0, seed=1,
                        weight_decay=0.0, blur_sigma=0.0)
    moved = np.sqrt(((one.images - ascent.initial_images(3, 16, 1, seed=1)) ** 2).sum((1, 2, 3)))
    np.testing.assert_allclose(moved, 2.0 * 255 * 0.35, rtol=1e-4)


# ------------------------------------------------------------------------------ on a real run

def test_training_logs_a_cluster_montage_that_the_cli_redraws(trained, tmp_path):
    logged = _images_in_events(os.path.join(trained.model_dir, "logs"))
    assert ("clusters", 0) in logged, sorted(logged)
    image = logged[("clusters", 0)][0]
    thumb, per = cluster_montage.THUMB_SIZE, cluster_montage.IMAGES_PER_CLUSTER
    row = montage.CAPTION_HEIGHT + thumb + 4
    assert image.shape == (cluster_montage.CLUSTERS_SHOWN * row, per * (thumb + 2) + 2, 3)
    assert "purity" in cluster_montage.caption_text(
        {"cluster": 1, "size": 5, "majority_label": 2, "purity": 0.5})
    paths = _visualize("clusters", trained.model_dir, tmp_path, epoch="0")
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), image)
    redrawn = _images_in_events(tmp_path / "logs")[("clusters", 0)][0]
    np.testing.assert_array_equal(redrawn, image)


def test_filters_cli_writes_a_png_grid_and_tensorboard_images(trained, tmp_path):
    out = tmp_path / "viz"
    result = subprocess.run(
        [sys.executable, "-m", "dc_tf.visualize", "filters", f"--model={trained.model_dir}",
         "--layer=conv2", "--channels=0,3,63", "--steps=3", f"--output_dir={out}",
         f"--logdir={out / 'logs'}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    png = np.asarray(Image.open(out / "filters_conv2.png"))
    cell = (montage.CAPTION_HEIGHT + 64, 64)  # 32 px enlarged to 64, captioned
    grid = (2 * (cell[0] + 2) + 2, 2 * (cell[1] + 2) + 2)  # 3 cells in 2 columns
    assert png.shape[0] == montage.CAPTION_HEIGHT + grid[0] and png.shape[1] >= grid[1]
    assert [np.asarray(i).shape for i in _images_in_events(out / "logs")[("filters/conv2", 1)]] \
        == [png.shape]
    bad = subprocess.run(
        [sys.executable, "-m", "dc_tf.visualize", "filters", f"--model={trained.model_dir}",
         "--layer=conv9", f"--output_dir={out}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "error: --layer=conv9" in bad.stderr, bad.stderr[-500:]
    assert "conv3, fc6" in bad.stderr


def test_top_images_are_the_highest_mean_activations(trained, tmp_path):
    from dc_tf import data
    from dc_tf.visualization import trained as loading
    paths = _visualize("top_images", trained.model_dir, tmp_path, layer="conv3",
                       channels=("2", "17"), batch_size=100)
    with open(tmp_path / "top_images" / "conv3.json") as f:
        report = json.load(f)
    backbone, epochs = loading.restore_backbone(trained)
    assert epochs == 1
    images = data.open_source(trained.dataset, "", trained.num_examples).images
    means = backbone(images.astype(np.float32))["conv3"].numpy().mean((1, 2))
    for entry in report["channels"]:
        c = entry["channel"]
        expected = np.lexsort((np.arange(len(means)), -means[:, c]))[:9]
        assert [e["index"] for e in entry["examples"]] == expected.tolist()
        np.testing.assert_allclose([e["score"] for e in entry["examples"]], means[expected, c],
                                   rtol=1e-4, atol=1e-5)
    montages = [np.asarray(Image.open(p)) for p in paths if p.endswith(".png")]
    assert len(montages) == 2
    side = 3 * (64 + 2) + 2
    assert all(m.shape == (montage.CAPTION_HEIGHT + side, side, 3) for m in montages)
    assert len(_images_in_events(tmp_path / "logs")[("top_images/conv3", 1)]) == 2


def test_projector_files_load_in_tensorboards_projector_plugin(trained, tmp_path):
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import Client
    from dc_tf.visualization import projector
    _visualize("projector", trained.model_dir, tmp_path, num_images=50)
    logdir = str(tmp_path)  # as `tensorboard --logdir`: the projector files are in run "logs"
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(logdir)
    mux.Reload()
    plugin = ProjectorPlugin(base_plugin.TBContext(
        logdir=logdir, data_provider=data_provider.MultiplexerDataProvider(mux, logdir)))
    apps = plugin.get_plugin_apps()

    def get(route, **query):
        response = Client(apps[route]).get(route, query_string=query)
        assert response.status_code == 200, response.get_data()[:300]
        return response.get_data()

    assert json.loads(get("/runs")) == ["logs"]
    name = projector.tensor_name("fc7_pre_relu")
    info = json.loads(get("/info", run="logs"))
    assert info["embeddings"][0]["tensorShape"] == [50, 512]
    features = np.frombuffer(get("/tensor", run="logs", name=name), np.float32).reshape(50, 512)
    lines = get("/metadata", run="logs", name=name).decode().splitlines()
    assert lines[0].split("\t") == ["index", "source", "cluster_final", "label"]
    rows = [line.split("\t") for line in lines[1:]]
    indices = np.array([int(r[0]) for r in rows])
    assert len(rows) == 50 and len(set(indices)) == 50
    final = np.load(os.path.join(trained.model_dir, "assignments", "final.npy"))
    assert [int(r[2]) for r in rows] == final[indices].tolist()
    from dc_tf import data
    from dc_tf.visualization import trained as loading
    source = data.open_source(trained.dataset, "", trained.num_examples)
    assert [int(r[3]) for r in rows] == source.labels[indices].tolist()
    backbone, _ = loading.restore_backbone(trained)
    expected = backbone(source.images[indices].astype(np.float32))["fc7_pre_relu"].numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    sprite = Image.open(io.BytesIO(get("/sprite_image", run="logs", name=name)))
    assert sprite.size == (math.ceil(math.sqrt(50)) * 32,) * 2
