"""Bad input fails before any work with a message naming the flag, the value and the fix;
unreadable images are skipped and counted; a diverging run keeps its last good checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, config_from_flagfile, folder_smoke_config, write_image
from dc_tf import config, data, train
from dc_tf import model as model_module
from dc_tf.checkpoint import NonFiniteLossError
from dc_tf.model import DeepClusterModel, DeepClusterV2Model


@pytest.mark.parametrize("flag, message", [
    ("--arch=lenet", "--arch=lenet: unknown architecture"),
    ("--learning_rate=-0.1", "--learning_rate=-0.1: must be > 0"),
    ("--epochs=-1", "--epochs=-1: must be >= 0"),
    ("--batch_size=0", "--batch_size=0: must be a positive integer"),
    ("--num_clusters=1", "--num_clusters=1: DeepCluster needs at least 2"),
    ("--clustering=dbscan", "--clustering=dbscan: choose one of kmeans, pic"),
    ("--crop_scale=0.5,2", "--crop_scale=0.5,2.0: needs 0 < min <= max <= 1"),
    ("--std=0", "--std=0.0: every standard deviation must be > 0"),
    ("--mean=a", "--mean=a: give comma-separated numbers"),
    ("--momentum=1.5", "--momentum=1.5: must be in [0, 1)"),
    ("--reassign=0", "--reassign=0: must be a positive integer"),
    ("--kmeans_mode=hnsw", "--kmeans_mode=hnsw: choose one of exact, two_level, shortlist"),
    ("--strategy=tpu", "--strategy=tpu: choose one of default, mirrored, multi_worker"),
])
def test_flag_values_no_run_can_use(smoke_config, flag, message):
    with pytest.raises(config.ConfigError) as e:
        smoke_config(flag)
    assert message in str(e.value)


@pytest.mark.parametrize("flag, message", [
    ("--num_clusters=1000", "--num_clusters=1000: exceeds the 512 images"),
    ("--pca_dim=600", "--pca_dim=600: exceeds the 512-d clustering feature of --arch=small_vgg"),
    ("--arch=alexnet", "--image_size=32 is too small for --arch=alexnet"),
    ("--mean=0.5,0.5 --std=0.3,0.3", "--mean has 2 values for 1-channel images"),
    ("--batch_size=1024", "--batch_size=1024: exceeds the 512 images"),
])
def test_data_dependent_values_fail_before_any_work(smoke_config, flag, message):
    cfg = smoke_config(*flag.split())
    with pytest.raises(config.ConfigError) as e:
        train.run(cfg)
    assert message in str(e.value)
    assert not os.path.exists(cfg.model_dir), "the run started work before failing"


def test_command_line_error_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
         f"--model_dir={tmp_path}/run", "--learning_rate=-1"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --learning_rate=-1.0: must be > 0 (paper: 0.05)")


@pytest.mark.parametrize("flag, message", [
    ("--num_clusterz=10", "Unknown command line flag 'num_clusterz'"),
    ("--num_clusters=ten", "flag --num_clusters=ten: invalid literal for int()"),
    ("--learning_rate=fast", "flag --learning_rate=fast: could not convert string to float"),
])
def test_unknown_flags_and_wrong_types_are_named(tmp_path, flag, message):
    result = subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
         f"--model_dir={tmp_path}/run", flag], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-1000:]
    assert not os.path.exists(tmp_path / "run")


def test_missing_dataset_names_the_package(smoke_config, tmp_path):
    cfg = smoke_config(f"--data_dir={tmp_path}")
    with pytest.raises(data.DatasetNotFoundError, match="dataset-fashion-mnist"):
        train.run(cfg)


def test_other_flags_on_an_existing_model_dir_are_refused(smoke_config):
    cfg = smoke_config("--epochs=1")
    train.run(cfg)
    with pytest.raises(config.ConfigError, match="--num_clusters: 10 there, 12 now"):
        train.run(smoke_config("--epochs=1", "--num_clusters=12"))


def test_unreadable_images_are_skipped_counted_and_excluded(tmp_path):
    root = tmp_path / "images"
    for i in range(24):
        write_image(f"{root}/c{i % 3}/img{i:02d}.jpg", (40 + i, 36), "RGB", seed=i)
    open(f"{root}/c0/zero.jpg", "wb").close()
    with open(f"{root}/c1/text.png", "w") as f:
        f.write("hello")
    cfg = folder_smoke_config(root, f"{tmp_path}/run")
    cfg = train.run(cfg)
    assert cfg.num_examples == 26
    row = json.loads(open(f"{cfg.model_dir}/metrics.jsonl").readline())
    assert row["skipped_images"] == 2
    labels = np.load(f"{cfg.model_dir}/assignments/epoch_0000.npy")
    source = data.open_source(cfg.dataset)
    bad = [source.paths.index(os.path.join("c0", "zero.jpg")),
           source.paths.index(os.path.join("c1", "text.png"))]
    assert (labels[bad] == -1).all() and (np.delete(labels, bad) >= 0).all()
    rows = [line.split("\t") for line in open(f"{cfg.model_dir}/skipped.tsv").read().splitlines()]
    assert rows[0] == ["index", "source", "reason"]
    assert sorted(int(r[0]) for r in rows[1:]) == sorted(bad)
    assert {r[1] for r in rows[1:]} == {os.path.join("c0", "zero.jpg"), os.path.join("c1", "text.png")}
    assert all(r[2] for r in rows[1:])
    examples = open(f"{cfg.model_dir}/examples.tsv").read().splitlines()
    assert len(examples) == 27 and examples[1] == f"0\t{source.paths[0]}\t0"


class DivergingModel(DeepClusterModel):
    """Fault injection: the top layer of the second reclustering (epoch 1) has a NaN bias."""

    def reset_head(self):
        super().reset_head()
        if int(self.optimizer.iterations) > 0:
            self.head.bias.assign(tf.fill(self.head.bias.shape, np.nan))


class DivergingV2Model(DeepClusterV2Model):
    """Fault injection: from epoch 1 on, the embedding is NaN (so the loss and the weights)."""

    def _embed(self, images, training):
        outputs, z = super()._embed(images, training)
        return outputs, tf.cond(self.epoch >= 1, lambda: z * np.nan, lambda: z)


@pytest.mark.parametrize("flagfile, name, diverging", [
    ("smoke.cfg", "DeepClusterModel", DivergingModel),
    ("smoke_v2.cfg", "DeepClusterV2Model", DivergingV2Model)])
def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, flagfile, name,
                                                        diverging):
    monkeypatch.setattr(model_module, name, diverging)
    cfg = config_from_flagfile(flagfile, f"--model_dir={tmp_path / 'run'}", "--epochs=2")
    with pytest.raises(NonFiniteLossError, match="non-finite in epoch 1"):
        train.run(cfg)
    index = open(os.path.join(cfg.model_dir, "checkpoints", "checkpoint")).read()
    assert 'model_checkpoint_path: "ckpt-1"' in index
    rows = open(os.path.join(cfg.model_dir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0]
    monkeypatch.undo()
    train.run(cfg)  # the same command resumes from ckpt-1
    rows = open(os.path.join(cfg.model_dir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1]
