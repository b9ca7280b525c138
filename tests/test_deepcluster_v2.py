"""DeepCluster-v2: spherical k-means, the model's train_step and bank, multi-crop views, a real
fit() through the training entry point, resume, the export, and flags of the other method."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, config_from_flagfile
from dc_core import clustering
from dc_core import transforms
from dc_core.sources import ArraySource
from dc_tf import config, models, optim
from dc_tf.data import pipelines
from dc_tf.model import DeepClusterV2Model, spread_penalty


def _unit_rows(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _spherical_reference(x, k, seed, niter):
    """Plain numpy: the same start rows, argmax of dot products, normalised means."""
    centroids = x[np.random.default_rng(seed).choice(len(x), k, replace=False)].astype(np.float64)
    for _ in range(niter):
        labels = np.argmax(x @ centroids.T, axis=1)
        for c in range(k):
            if (labels == c).any():
                mean = x[labels == c].sum(0)
                centroids[c] = mean / np.linalg.norm(mean)
    return np.argmax(x @ centroids.T, axis=1), centroids


def test_spherical_kmeans_matches_a_numpy_reference():
    x = _unit_rows(300, 8, seed=0)
    result = clustering.spherical_kmeans(x, 7, seed=3, niter=10)
    labels, centroids = _spherical_reference(x, 7, seed=3, niter=10)
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_allclose(result.centroids, centroids, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, atol=1e-5)
    similarity = np.sum(x * centroids[labels], axis=1)
    assert result.loss == pytest.approx(np.sum(2 - 2 * similarity), rel=1e-5)
    with pytest.raises(ValueError, match="num_clusters=301"):
        clustering.spherical_kmeans(x, 301, seed=0)


def test_an_empty_centroid_keeps_its_place():
    x = _unit_rows(50, 4, seed=1)
    x[0] = x[1]  # two start rows that coincide: one of them can win no row
    result = clustering.spherical_kmeans(x, 2, seed=0, niter=3)
    assert result.centroids.shape == (2, 4) and np.isfinite(result.centroids).all()


def _tiny_model(n=40, prototypes=(5, 3), global_crops=2, feature_spread=0.0):
    backbone = models.build_backbone("small_vgg", 8, 1, False, (0.5,), (0.25,), seed=0,
                                     dropout=False)
    model = DeepClusterV2Model(backbone, "fc7", n, prototypes, (16, 8), 0.1, 1e-6, seed=0,
                               global_crops=global_crops, feature_spread=feature_spread,
                               spread_endpoints=models.spread_endpoints("small_vgg"))
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def test_a_training_step_writes_the_bank_by_index_and_leaves_the_prototypes():
    n = 40
    model = _tiny_model(n, global_crops=3)
    rng = np.random.default_rng(0)
    for prototypes in model.prototypes:
        prototypes.assign(_unit_rows(prototypes.shape[1], 8, seed=2).T)
    model.assignments.assign(rng.integers(0, 3, (2, n)).astype(np.int32))
    before = {"prototypes": [p.numpy() for p in model.prototypes],
              "backbone": [v.numpy() for v in model.backbone.trainable_variables],
              "bank": model.bank.numpy()}
    indices = np.array([3, 17, 5, 30], np.int32)
    views = tuple(tf.constant(rng.uniform(0, 255, (4, 8, 8, 1)), tf.float32) for _ in range(3))
    # The step's embeddings of the global crops, before its update (BN on the batch's statistics).
    embedded = model(tf.concat(views, 0), training=True).numpy()
    ds = tf.data.Dataset.from_tensors((views, indices))
    model.fit(ds, epochs=1, verbose=0)  # train_step inside a tf.function
    bank = model.bank.numpy()
    written = np.zeros(n, bool)
    written[indices] = True
    np.testing.assert_array_equal(bank[~written], before["bank"][~written])
    np.testing.assert_allclose(bank[indices, 0], embedded[:4], atol=1e-5)  # crop 0
    np.testing.assert_allclose(bank[indices, 1], embedded[4:8], atol=1e-5)  # crop 1, not 2
    for p_before, p in zip(before["prototypes"], model.prototypes):
        np.testing.assert_array_equal(p.numpy(), p_before)
    assert any(not np.array_equal(v.numpy(), b)
               for v, b in zip(model.backbone.trainable_variables, before["backbone"]))


def test_spread_penalty_is_minus_log_the_participation_ratio():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 12)) * np.geomspace(10, 0.1, 12)  # a decaying spectrum
    eigenvalues = np.linalg.eigvalsh(np.cov(x.T))
    expected = -np.log(eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum())
    got = spread_penalty(tf.constant(x, tf.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # Scale-free, and 0 (one direction) to -log(c) (c equal directions).
    np.testing.assert_allclose(spread_penalty(tf.constant(7 * x, tf.float32)), got, rtol=1e-4)
    line = np.outer(rng.normal(size=50), rng.normal(size=12))
    np.testing.assert_allclose(spread_penalty(tf.constant(line, tf.float32)), 0.0, atol=1e-5)
    even = np.concatenate([np.eye(12), -np.eye(12)]) * 3.0
    np.testing.assert_allclose(spread_penalty(tf.constant(even, tf.float32)), -np.log(12),
                               rtol=1e-5)
    # A feature map counts as its flattened rows.
    np.testing.assert_allclose(spread_penalty(tf.constant(x.reshape(50, 2, 3, 2), tf.float32)),
                               got, rtol=1e-6)


def test_feature_spread_trains_conv3_fc6_and_fc7_onto_more_directions():
    """With the prototypes at zero the cross-entropy has no gradient: the steps follow the
    spread term alone, and the participation ratios of conv3, fc6 and fc7 over the batch must
    grow."""
    model = _tiny_model(feature_spread=1.0)
    model.optimizer.learning_rate.assign(0.005)  # this tiny network's steps at 0.05 overshoot
    model.assignments.assign(np.zeros((2, 40), np.int32))
    rng = np.random.default_rng(1)
    views = tuple(tf.constant(rng.uniform(0, 255, (32, 8, 8, 1)), tf.float32) for _ in range(2))
    batch = tf.concat(views, 0)

    def ratios():
        outputs = model.backbone(batch, training=True)
        return np.exp([-spread_penalty(outputs[name]).numpy() for name in ("conv3", "fc6", "fc7")])

    before = ratios()
    model.fit(tf.data.Dataset.from_tensors((views, np.arange(32, dtype=np.int32))).repeat(40),
              epochs=1, verbose=0)
    assert (ratios() > 1.5 * before).all(), (before, ratios())


def test_multicrop_views_have_their_sizes_and_every_example_comes_once():
    n = 24
    images = np.random.default_rng(0).integers(0, 255, (n, 12, 12, 1), dtype=np.uint8)
    source = ArraySource("test", n, 1, None, images=images)
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = pipelines.multicrop_dataset(source, epoch, 10, 3, (0.3, 1.0), 3, 6, (0.05, 0.2),
                                     (0.75, 1.33), batch_size=8, steps=3, seed=0,
                                     color_jitter=1.0, blur=True)
    batches = list(ds)
    assert len(batches) == 3
    views, indices = batches[0]
    assert [v.shape for v in views] == [(8, 10, 10, 1)] * 3 + [(8, 6, 6, 1)] * 3
    assert all(v.dtype == tf.float32 for v in views) and indices.dtype == tf.int32
    seen = np.concatenate([b[1].numpy() for b in batches])
    assert sorted(seen) == list(range(n))
    epoch.assign(1)  # the next epoch: another order
    assert not np.array_equal(np.concatenate([b[1].numpy() for b in ds]), seen)


@pytest.fixture(scope="module")
def trained_v2(tmp_path_factory):
    from dc_tf import train
    model_dir = tmp_path_factory.mktemp("v2") / "run"
    return train.run(config_from_flagfile("smoke_v2.cfg", f"--model_dir={model_dir}"))


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_fit_two_epochs_of_v2_writes_the_model_dir_layout(trained_v2):
    d = trained_v2.model_dir
    rows = _metrics(d)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["train_images_per_s"] > 0
        for key in ("kmeans_loss", "empty_clusters", "nmi_labels", "time_cluster_s",
                    "kmeans_loss_head1", "empty_clusters_head1", "nmi_labels_head1"):
            assert r[key] is not None, key
    assert rows[0]["nmi_prev"] is None and 0 <= rows[1]["nmi_prev"] <= 1
    assert rows[0]["time_features_s"] > 0  # the bank's first filling
    for name in ("epoch_0000.npy", "epoch_0001.npy", "final.npy"):
        labels = np.load(os.path.join(d, "assignments", name))
        assert labels.shape == (512,) and labels.min() >= 0 and labels.max() < 10, name
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["method"] == "deepcluster_v2"
    with open(os.path.join(d, "report.html"), encoding="utf-8") as f:
        page = f.read()  # the same page as DeepCluster's, its curves, table and gallery
    assert "DeepCluster-v2, small_vgg, 10/10 prototypes" in page and "finished" in page
    assert page.count("data:image/png;base64,") == 3 and "majority class" in page


def test_resumed_v2_run_is_the_uninterrupted_one(trained_v2, tmp_path):
    """Bank, prototypes, assignments, the optimizer and the schedule's step come back from the
    checkpoint: a run killed after its first checkpoint and run again gives the uninterrupted
    run bit for bit."""
    from dc_tf import train
    resumed = str(tmp_path / "resumed")
    killed = subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke_v2.cfg",
         f"--model_dir={resumed}"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "DC_TF_FAILPOINT": "checkpoint.saved:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = {name for name, _ in tf.train.list_variables(os.path.join(resumed, "checkpoints"))}
    for variable in ("bank", "assignments", "prototypes_0", "prototypes_1"):
        assert f"model/{variable}/.ATTRIBUTES/VARIABLE_VALUE" in names, variable
    assert [r["epoch"] for r in _metrics(resumed)] == [0]
    train.run(config_from_flagfile("smoke_v2.cfg", f"--model_dir={resumed}"))
    for name in ("epoch_0000.npy", "epoch_0001.npy", "final.npy"):
        np.testing.assert_array_equal(np.load(os.path.join(resumed, "assignments", name)),
                                      np.load(os.path.join(trained_v2.model_dir, "assignments",
                                                           name)), err_msg=name)
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in
                                                       _metrics(trained_v2.model_dir)]


def test_v2_export_reloads_without_dc_tf_and_assign_gives_the_final_clustering(trained_v2,
                                                                               tmp_path):
    from dc_tf import data
    cfg = trained_v2
    images = data.open_source(cfg.dataset, cfg.data_dir, cfg.num_examples).images
    np.save(tmp_path / "images.npy", images)
    script = f"""
import sys, numpy as np, tensorflow as tf
m = tf.saved_model.load({os.path.join(cfg.model_dir, 'export')!r})
assert not [k for k in sys.modules if k.startswith("dc_tf")], "dc_tf was imported"
images = tf.constant(np.load({str(tmp_path / 'images.npy')!r}))
out = m.signatures["serving_default"](images=images[:8])
assert {{"conv1", "conv2", "conv3", "fc6", "fc7", "embedding"}} <= set(out), sorted(out)
assert out["embedding"].shape == (8, 32)
np.testing.assert_allclose(np.linalg.norm(out["embedding"].numpy(), axis=1), 1.0, atol=1e-5)
cluster = m.signatures["assign"](images=images)["cluster"].numpy()
final = np.load({os.path.join(cfg.model_dir, 'assignments', 'final.npy')!r})
agree = (cluster == final).mean()
print("assign agrees with final.npy on", agree)
assert agree >= 0.999, agree
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_visualiser_restores_a_v2_run_as_trained(trained_v2, capfd):
    """dc_tf.visualize rebuilds the run's own model: every checkpoint value finds its variable,
    and the restored backbone computes the export's fc7."""
    from dc_tf.visualization import trained
    backbone, epochs = trained.restore_backbone(trained.load_config(trained_v2.model_dir))
    assert epochs == 2
    assert "could not be found" not in capfd.readouterr().err
    images = tf.constant(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 1)), tf.uint8)
    export = tf.saved_model.load(os.path.join(trained_v2.model_dir, "export"))
    np.testing.assert_allclose(
        backbone(tf.cast(images, tf.float32), training=False)["fc7"].numpy(),
        export.signatures["serving_default"](images=images)["fc7"].numpy(), atol=1e-4)


@pytest.mark.parametrize("flagfile, flag, message", [
    ("smoke_v2.cfg", "--pca_dim=16", "--method=deepcluster_v2 does not use --pca_dim"),
    ("smoke_v2.cfg", "--num_clusters=5", "does not use --num_clusters"),
    ("smoke.cfg", "--temperature=0.2", "--method=deepcluster does not use --temperature"),
    ("smoke.cfg", "--feature_spread=0.1", "--method=deepcluster does not use --feature_spread"),
    ("smoke.cfg", "--method=deepcluster_v2",
     "--method=deepcluster_v2 does not use --num_clusters, --clustering, --pca_dim"),
])
def test_a_flag_of_the_other_method_is_refused(flagfile, flag, message):
    with pytest.raises(config.ConfigError, match=message):
        config_from_flagfile(flagfile, flag)


def test_v2_values_are_checked_before_any_work():
    with pytest.raises(config.ConfigError, match="--local_crop_size=16: --arch=small_vgg"):
        config_from_flagfile("smoke_v2.cfg", "--local_crops=2", "--local_crop_size=16")
    with pytest.raises(config.ConfigError, match="--num_prototypes=1,10"):
        config_from_flagfile("smoke_v2.cfg", "--num_prototypes=1,10")
    with pytest.raises(config.ConfigError, match="--temperature=0.0"):
        config_from_flagfile("smoke_v2.cfg", "--temperature=0")
    with pytest.raises(config.ConfigError, match="--epochs=0: .*--method=deepcluster --epochs=0"):
        config_from_flagfile("smoke_v2.cfg", "--epochs=0")
    with pytest.raises(config.ConfigError, match="--warmup_epochs=2: needs 0 <= warm-up < "):
        config_from_flagfile("smoke_v2.cfg", "--warmup_epochs=2")
    with pytest.raises(config.ConfigError, match="--final_learning_rate=1.0: needs 0 <= "):
        config_from_flagfile("smoke_v2.cfg", "--final_learning_rate=1")
    with pytest.raises(config.ConfigError, match="--feature_spread=-0.1: needs 0 <= weight"):
        config_from_flagfile("smoke_v2.cfg", "--feature_spread=-0.1")


def test_the_schedule_warms_up_from_zero_then_follows_a_cosine_to_the_final_rate():
    cfg = config.TrainConfig(method="deepcluster_v2", epochs=10, learning_rate=0.4,
                             warmup_epochs=2, final_learning_rate=0.004)
    rate = optim.learning_rate(cfg, steps_per_epoch=5)
    steps = np.arange(0, 51)
    values = np.array([float(rate(s)) for s in steps])
    np.testing.assert_allclose(values[:11], 0.4 * steps[:11] / 10, rtol=1e-5, atol=1e-7)
    cosine = 0.004 + (0.4 - 0.004) * (1 + np.cos(np.pi * (steps[10:] - 10) / 40)) / 2
    np.testing.assert_allclose(values[10:], cosine, rtol=1e-4, atol=1e-7)
    assert optim.learning_rate(config.TrainConfig(learning_rate=0.3), 5) == 0.3  # constant


def test_larc_scales_each_variables_step_by_its_trust_ratio():
    """Against apex's LARC (clip=False): (g + wd w) * trust |w| / (|g| + wd |w| + eps), and the
    plain gradient where a weight or gradient norm is zero."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 4)), rng.normal(size=5) * 10, np.zeros(2)]
    grads = [rng.normal(size=(3, 4)) * 1e-3, rng.normal(size=5), np.ones(2)]
    wd, trust = 1e-3, 0.02
    out = optim.larc([tf.constant(g, tf.float32) for g in grads],
                     [tf.Variable(w, dtype=tf.float32) for w in weights], wd, trust)
    for g, w, o in zip(grads, weights, out):
        if np.linalg.norm(w) == 0:
            expected = g
        else:
            ratio = trust * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w) + 1e-8)
            expected = (g + wd * w) * ratio
        np.testing.assert_allclose(o.numpy(), expected, rtol=1e-5)


def test_color_distortion_is_stateless_keeps_the_range_and_the_channels():
    rng = np.random.default_rng(0)
    for channels in (1, 3):
        image = tf.constant(rng.uniform(0, 255, (12, 12, channels)), tf.float32)
        seeds = [tf.constant([s, 7], tf.int64) for s in range(8)]
        outs = [transforms.color_distortion(image, 1.0, s).numpy() for s in seeds]
        np.testing.assert_array_equal(outs[0], transforms.color_distortion(image, 1.0,
                                                                           seeds[0]).numpy())
        assert all(o.shape == (12, 12, channels) and o.min() >= 0 and o.max() <= 255.0001
                   for o in outs)
        assert sum(not np.allclose(o, image.numpy()) for o in outs) >= 4  # p = 0.8
        assert len({o.tobytes() for o in outs}) >= 5


def test_gaussian_blur_matches_scipy():
    from scipy import ndimage
    image = np.random.default_rng(1).uniform(0, 255, (10, 11, 2)).astype(np.float32)
    for seed in range(6):  # p = 0.5: some views blurred, some left alone
        out = transforms.gaussian_blur(tf.constant(image), (1.0, 1.0),
                                       tf.constant([seed, 3], tf.int64)).numpy()
        if np.array_equal(out, image):
            continue
        reference = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0), mode="mirror",
                                            truncate=3.0)
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-3)
        break
    else:
        pytest.fail("no view of six was blurred")
