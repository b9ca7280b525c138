"""End to end: a real fit() with the real ReclusterCallback, the model_dir layout, the export
reloaded in a process that never imports dc_tf, and resuming (a killed run resuming is
tests/reliability/test_kill_anywhere.py's)."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import config_from_flagfile

METRIC_FIELDS = {"epoch", "loss", "kmeans_loss", "nmi_prev", "nmi_labels", "empty_clusters",
                 "time_features_s", "time_cluster_s", "time_train_s", "train_images_per_s"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dc_tf import train
    model_dir = tmp_path_factory.mktemp("smoke") / "run"
    return train.run(config_from_flagfile("smoke.cfg", f"--model_dir={model_dir}"))


@pytest.mark.parametrize("batch, expected", [(64, 256), (256, 256), (100, 300), (512, 512)])
def test_feature_pass_batch_is_the_least_multiple_of_the_training_batch_from_256(batch, expected):
    from dc_tf.data import pipelines
    assert pipelines.feature_batch_size(batch) == expected


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_fit_two_epochs_writes_the_model_dir_layout(trained):
    d = trained.model_dir
    for name in ("metrics.jsonl", "assignments", "logs", "checkpoints", "export", "config.json"):
        assert os.path.exists(os.path.join(d, name)), name
    rows = _metrics(d)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert METRIC_FIELDS <= set(r), METRIC_FIELDS - set(r)
        assert np.isfinite(r["loss"]) and r["train_images_per_s"] > 0
        assert 0 <= r["nmi_labels"] <= 1  # Fashion-MNIST has labels
    assert rows[0]["nmi_prev"] is None and 0 <= rows[1]["nmi_prev"] <= 1
    for epoch in (0, 1, "final"):
        name = f"epoch_{epoch:04d}.npy" if epoch != "final" else "final.npy"
        labels = np.load(os.path.join(d, "assignments", name))
        assert labels.dtype == np.int32 and labels.shape == (trained.num_examples,)
        # Every cluster of k-means on 512 images holds images after the empty-cluster repair.
        assert set(np.unique(labels)) == set(range(trained.num_clusters))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(d, "logs")))
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["num_examples"] == 512


def test_export_matches_the_trained_network_in_a_fresh_process(trained, tmp_path):
    """fc7 of the SavedModel (loaded without dc_tf) equals the restored training network's, and
    its `assign` signature reproduces the final clustering of the training images."""
    import keras
    from dc_tf import data, models
    from dc_tf.checkpoint import RunCheckpoint
    from dc_tf.model import DeepClusterModel

    cfg = trained
    backbone = models.build_backbone(cfg.arch, cfg.image_size, cfg.channels, cfg.sobel, cfg.mean,
                                     cfg.std, seed=123)  # other init: the restore must matter
    model = DeepClusterModel(backbone, models.head_endpoint(cfg.arch), cfg.num_examples,
                             cfg.num_clusters, cfg.weight_decay, seed=0)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.optimizers.SGD(0.1))
    assert RunCheckpoint(model, os.path.join(cfg.model_dir, "checkpoints")).restore() == 2
    source = data.open_source(cfg.dataset, cfg.data_dir, cfg.num_examples)
    images = source.images  # 32x32 already: the feature pass's centre crop leaves them as they are
    expected = backbone(images[:16].astype(np.float32), training=False)
    final = np.load(os.path.join(cfg.model_dir, "assignments", "final.npy"))
    np.savez(tmp_path / "io.npz", images=images, fc7=expected["fc7"].numpy(),
             conv3=expected["conv3"].numpy(), final=final)
    script = f"""
import sys, numpy as np, tensorflow as tf
m = tf.saved_model.load({os.path.join(cfg.model_dir, 'export')!r})
assert not [k for k in sys.modules if k.startswith("dc_tf")], "dc_tf was imported"
io = np.load({str(tmp_path / 'io.npz')!r})
out = m.signatures["serving_default"](images=tf.constant(io["images"][:16]))
assert sorted(out) == ["conv1", "conv2", "conv3", "fc6", "fc7", "fc7_pre_relu"], sorted(out)
diff = np.abs(out["fc7"].numpy() - io["fc7"]).max()
print("max abs diff", diff)
assert diff < 1e-4, diff
assigned = m.signatures["assign"](images=tf.constant(io["images"]))
agree = (assigned["cluster"].numpy() == io["final"]).mean()
print("assign agrees with assignments/final.npy on", agree)
assert agree >= 0.999, agree
assert assigned["cluster"].dtype == tf.int32 and assigned["embedding"].shape == (512, 32)
assert set(np.unique(assigned["cluster"].numpy())) <= set(np.unique(io["final"]))
conv = m.signatures["conv_features"]
assert sorted(conv(images=tf.constant(io["images"][:2]))) == ["conv1", "conv2", "conv3"]
diff = np.abs(conv(images=tf.constant(io["images"][:16]))["conv3"].numpy() - io["conv3"]).max()
assert diff < 1e-4, diff
big = conv(images=tf.zeros([1, 48, 72, 1], tf.uint8))["conv3"]
assert big.shape == (1, 12, 18, 128), big.shape
weights = list(m.backbone_trainable_variables)
with tf.GradientTape() as tape:
    fc7 = m.signatures["serving_default"](images=tf.constant(io["images"][:4]))["fc7"]
    loss = tf.reduce_sum(fc7 * fc7)
grads = tape.gradient(loss, weights)
assert len(weights) > 10 and all(g is not None for g in grads), [w.name for w in weights]
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max abs diff" in result.stdout


def test_the_export_describes_itself_in_its_info_file(trained, tmp_path):
    """assets/dc_tf_export.json says what the export is (endpoints as its serving signature
    has them); a copy of the folder keeps it, and eval.features reads it back."""
    import shutil

    import tensorflow as tf
    from dc_tf import export, models
    from eval.features import ExportedBackbone

    cfg = trained
    path = os.path.join(cfg.model_dir, "export")
    with open(os.path.join(path, export.INFO_FILE)) as f:
        info = json.load(f)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    assert (info["format"], info["format_version"]) == ("dc_tf_export", export.INFO_VERSION)
    assert info["method"] == "deepcluster"
    assert (info["arch"], info["image_size"], info["channels"], info["min_size"]) == (
        "small_vgg", 32, 1, models.min_image_size("small_vgg"))
    assert (info["input_dtype"], info["input_range"]) == ("uint8", [0, 255])
    assert info["normalization"] == {"mean": list(cfg.mean), "std": list(cfg.std)}
    assert info["sobel"] is False
    assert info["endpoints"] == {name: list(out.shape[1:])
                                 for name, out in sorted(serve.structured_outputs.items())}
    assert info["conv_endpoints"] == ["conv1", "conv2", "conv3"]
    assert info["signatures"] == ["assign", "conv_features", "serving_default"]
    assert (info["embedding"], info["assign"]) == (False, True)
    assert (info["cluster_endpoint"], info["num_clusters"]) == ("fc7_pre_relu", cfg.num_clusters)
    copy = shutil.copytree(path, tmp_path / "copy")
    backbone = ExportedBackbone(str(copy))
    assert backbone.info == info and backbone.arch == "small_vgg"


def test_the_info_file_records_the_method_and_the_front_end_the_caller_gives(tmp_path):
    from dc_tf import export, models

    backbone = models.build_backbone("small_vgg", 32, 3, True, (0.5,), (0.25,), seed=0)
    path = export.export_saved_model(backbone, str(tmp_path / "export"), 32, 3,
                                     models.min_image_size("small_vgg"), method="supervised")
    with open(os.path.join(path, export.INFO_FILE)) as f:
        info = json.load(f)
    assert (info["method"], info["arch"], info["channels"], info["sobel"]) == (
        "supervised", "small_vgg", 3, True)
    assert info["normalization"] == {"mean": [0.5], "std": [0.25]}
    assert info["signatures"] == ["conv_features", "serving_default"]
    assert (info["assign"], info["cluster_endpoint"], info["num_clusters"]) == (False, None, None)
    assert not os.path.exists(path.rstrip("/") + ".tmp")


def _same_run(a: str, b: str) -> bool:
    """Whether two model_dirs hold the same run: every assignment, every metrics loss and
    k-means loss, and the exported weights, bit for bit."""
    names = sorted(os.listdir(os.path.join(a, "assignments")))
    assert names == sorted(os.listdir(os.path.join(b, "assignments")))
    same = all(np.array_equal(np.load(os.path.join(a, "assignments", n)),
                              np.load(os.path.join(b, "assignments", n))) for n in names)
    figures = [[(r["loss"], r["kmeans_loss"]) for r in _metrics(d)] for d in (a, b)]
    weights = [open(os.path.join(d, "export", "variables",
                                 "variables.data-00000-of-00001"), "rb").read() for d in (a, b)]
    return same and figures[0] == figures[1] and weights[0] == weights[1]


def test_one_seed_gives_one_run_also_across_a_resume(trained, tmp_path):
    from dc_tf import train
    again = train.run(config_from_flagfile("smoke.cfg", f"--model_dir={tmp_path / 'again'}"))
    assert _same_run(trained.model_dir, again.model_dir)
    resumed = str(tmp_path / "resumed")
    train.run(config_from_flagfile("smoke.cfg", f"--model_dir={resumed}", "--epochs=1"))
    train.run(config_from_flagfile("smoke.cfg", f"--model_dir={resumed}", "--epochs=2"))
    assert _same_run(trained.model_dir, resumed)
    other = train.run(config_from_flagfile("smoke.cfg", f"--model_dir={tmp_path / 'other'}",
                                           f"--seed={trained.seed + 1}"))
    assert not _same_run(trained.model_dir, other.model_dir)
    for epoch in (0, 1):  # another seed: another k-means and another stream from epoch 0
        name = f"epoch_{epoch:04d}.npy"
        assert not np.array_equal(*(np.load(os.path.join(d, "assignments", name))
                                    for d in (trained.model_dir, other.model_dir)))


def test_jit_compile_can_be_switched_on_when_resuming(smoke_config):
    from dc_tf import train
    train.run(smoke_config("--epochs=1"))
    cfg = train.run(smoke_config("--epochs=2", "--jit_compile"))
    rows = [json.loads(line) for line in open(os.path.join(cfg.model_dir, "metrics.jsonl"))]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert all(np.isfinite(row["loss"]) for row in rows), rows
    assert json.load(open(os.path.join(cfg.model_dir, "config.json")))["jit_compile"] is True


@pytest.mark.parametrize("flagfile", ["smoke.cfg", "smoke_v2.cfg"])
def test_mixed_precision_can_be_switched_on_and_exports_float32(tmp_path, flagfile):
    import keras
    import tensorflow as tf
    from dc_tf import train

    def smoke_config(*args):
        return config_from_flagfile(flagfile, f"--model_dir={tmp_path / 'run'}", *args)
    train.run(smoke_config("--epochs=1"))
    cfg = train.run(smoke_config("--epochs=2", "--mixed_precision"))
    rows = [json.loads(line) for line in open(os.path.join(cfg.model_dir, "metrics.jsonl"))]
    assert [row["epoch"] for row in rows] == [0, 1]
    assert all(np.isfinite(row["loss"]) for row in rows), rows
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    export = tf.saved_model.load(os.path.join(cfg.model_dir, "export"))
    images = tf.zeros([2, cfg.image_size, cfg.image_size, cfg.channels], tf.uint8)
    outputs = export.signatures["serving_default"](images=images)
    assert {v.dtype for v in outputs.values()} == {tf.float32}
    assert export.signatures["assign"](images=images)["embedding"].dtype == tf.float32


def _run_counting_calls(smoke_config, monkeypatch, mode, function, recorded):
    """Trains the smoke run with --kmeans_mode=mode while counting calls to
    dc_core.clustering.kmeans.<function> (recorded(args) per call); checks that every epoch logged
    a finite k-means loss and returns (cfg, calls)."""
    from dc_tf import train
    kmeans_module = importlib.import_module("dc_core.clustering.kmeans")  # not the function
    calls, real = [], getattr(kmeans_module, function)

    def spy(*args, **kwargs):
        calls.append(recorded(args))
        return real(*args, **kwargs)
    monkeypatch.setattr(kmeans_module, function, spy)
    cfg = train.run(smoke_config(f"--kmeans_mode={mode}"))
    rows = [json.loads(line) for line in open(os.path.join(cfg.model_dir, "metrics.jsonl"))]
    assert len(rows) == cfg.epochs and all(np.isfinite(row["kmeans_loss"]) for row in rows)
    return cfg, calls


def test_kmeans_mode_two_level_reaches_faiss(smoke_config, monkeypatch):
    # FAISS's two-level clustering, with (number of cells, iterations).
    cfg, calls = _run_counting_calls(smoke_config, monkeypatch, "two_level",
                                     "two_level_clustering", lambda args: args[1:3])
    # k = 10 in smoke.cfg: about sqrt(10) = 3 cells; one call per reclustering and the final one.
    assert calls == [(3, 10)] * (cfg.epochs + 1)


def test_kmeans_mode_shortlist_reaches_its_lloyd_iterations(smoke_config, monkeypatch):
    # The shortlist iterations, with (k, niter).
    cfg, calls = _run_counting_calls(smoke_config, monkeypatch, "shortlist",
                                     "_shortlist_kmeans", lambda args: (args[1], args[3]))
    assert calls == [(10, cfg.kmeans_iters)] * (cfg.epochs + 1)
