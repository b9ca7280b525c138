"""--strategy=mirrored and multi_worker end to end, in subprocesses: MirroredStrategy over two
logical CPU devices, and MultiWorkerMirroredStrategy over two local worker processes.

Logical devices are configured once per process before TensorFlow initialises, and a
multi-worker strategy must be created before any other TF work, so every run here is a process
of its own, with a timeout that turns a hung collective into a failure.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT

TIMEOUT_S = 300
SMALL = ("--flagfile=flags/smoke.cfg", "--max_examples=256")
SMALL_V2 = ("--flagfile=flags/smoke_v2.cfg", "--max_examples=256")
# Two logical CPU devices, then the training entry point with the rest of the command line.
MIRRORED_DRIVER = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from absl import app
from dc_tf import train
sys.argv = ["dc_tf.train", *sys.argv[1:]]
app.run(train.main)
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    # CPU only: the replicas are the logical CPU devices, or one CPU per worker.
    return {**env, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _run(cmd, env):
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _free_ports(n):
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assignment(model_dir, epoch):
    return np.load(os.path.join(model_dir, "assignments", f"epoch_{epoch:04d}.npy"))


def _check_export(path):
    import tensorflow as tf
    export = tf.saved_model.load(str(path))
    out = export.signatures["serving_default"](images=tf.zeros([2, 32, 32, 1], tf.uint8))
    assert out["fc7"].shape == (2, 512) and np.isfinite(out["fc7"].numpy()).all()
    assert export.signatures["assign"](images=tf.zeros([2, 32, 32, 1], tf.uint8))[
        "cluster"].shape == (2,)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("mirrored") / "run"
    log = _run([sys.executable, "-c", MIRRORED_DRIVER, *SMALL, "--epochs=2",
                "--strategy=mirrored", f"--model_dir={model_dir}"], _env())
    return model_dir, log


def _train_two_workers(model_dir, *args, small=SMALL):
    """Runs two workers on 127.0.0.1 to the end; returns their logs [chief, worker]."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    cmd = [sys.executable, "-m", "dc_tf.train", *small, "--strategy=multi_worker",
           f"--model_dir={model_dir}", *args]
    procs = [subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": i}})))
        for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[1])
    finally:
        for proc in procs:
            if proc.poll() is None:  # a hung collective: fail instead of hanging
                proc.kill()
                proc.wait()
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"worker {i}:\n{log[-3000:]}"
    return logs


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    """Two workers train one epoch into one model_dir, then resume for a second one:
    (model_dir, [chief log, worker log] of the resumed run)."""
    model_dir = tmp_path_factory.mktemp("multi_worker") / "run"
    _train_two_workers(model_dir, "--epochs=1")
    return model_dir, _train_two_workers(model_dir, "--epochs=2")


def test_mirrored_trains_on_two_logical_cpus(mirrored):
    model_dir, log = mirrored
    assert "strategy: 2 replicas (MirroredStrategy" in log
    rows = _metrics(model_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["loss"]) and r["steps"] == 4 for r in rows), rows
    for epoch in (0, 1):
        labels = _assignment(model_dir, epoch)
        assert labels.dtype == np.int32 and labels.shape == (256,)
        assert set(np.unique(labels)) == set(range(10))
    assert os.path.exists(os.path.join(model_dir, "assignments", "final.npy"))
    _check_export(model_dir / "export")


def test_multi_worker_trains_every_worker_on_the_chiefs_pseudo_labels(multi_worker):
    model_dir, (chief_log, worker_log) = multi_worker
    for log in (chief_log, worker_log):
        assert "strategy: 2 replicas (MultiWorkerMirroredStrategy" in log
        # Every worker resumes from the chief's checkpoint.
        assert f"resumed from {model_dir}/checkpoints/ckpt-1 (1 epochs done)" in log
    assert "the chief" in chief_log.split("strategy:")[1].splitlines()[0]
    # k-means ran on the chief only; the worker assigned what the collective brought it.
    assert "epoch 1: kmeans of 256 x 32 features into k=10\n" in chief_log
    assert "epoch 1: kmeans of 256 x 32 features into k=10, on the chief\n" in worker_log
    scratch = model_dir / "workertemp_1"
    for epoch in (0, 1):
        chief, worker = _assignment(model_dir, epoch), _assignment(scratch, epoch)
        assert chief.shape == (256,) and set(np.unique(chief)) == set(range(10))
        np.testing.assert_array_equal(worker, chief, err_msg=f"epoch {epoch}")
    assert [r["epoch"] for r in _metrics(model_dir)] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in _metrics(model_dir))
    # Only the chief owns model_dir: its lock, config and export.
    assert (model_dir / ".lock").exists() and (model_dir / "config.json").exists()
    assert not (scratch / "export").exists() and not (scratch / "config.json").exists()
    _check_export(model_dir / "export")


def test_the_first_clustering_is_the_same_whatever_the_sharding(mirrored, multi_worker):
    """Epoch 0 clusters the seeded initial network's features: two replicas in one process and
    two workers shard the feature pass alike, and gather the same rows in the same order."""
    np.testing.assert_array_equal(_assignment(mirrored[0], 0), _assignment(multi_worker[0], 0))


def _bank(model_dir):
    import tensorflow as tf
    return tf.train.load_variable(str(model_dir / "checkpoints"),
                                  "model/bank/.ATTRIBUTES/VARIABLE_VALUE")


def _check_v2_run(model_dir):
    rows = _metrics(model_dir)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["loss"]) and r["steps"] == 4 for r in rows), rows
    for epoch in (0, 1):
        labels = _assignment(model_dir, epoch)
        assert labels.shape == (256,) and labels.min() >= 0 and labels.max() < 10
    # Every replica's rows reached the bank: the first filling writes one embedding into both
    # slots of a row, training two different crops, so no row may still hold equal slots.
    bank = _bank(model_dir)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=2), 1.0, atol=1e-4)
    assert (np.abs(bank[:, 0] - bank[:, 1]).max(axis=1) > 1e-4).all()
    _check_export(model_dir / "export")


def test_deepcluster_v2_trains_mirrored_on_two_logical_cpus(tmp_path):
    model_dir = tmp_path / "run"
    log = _run([sys.executable, "-c", MIRRORED_DRIVER, *SMALL_V2, "--epochs=2",
                "--strategy=mirrored", f"--model_dir={model_dir}"], _env())
    assert "strategy: 2 replicas (MirroredStrategy" in log
    _check_v2_run(model_dir)


def test_deepcluster_v2_trains_on_two_workers_with_the_chiefs_prototypes(tmp_path):
    model_dir = tmp_path / "run"
    _train_two_workers(model_dir, "--epochs=1", small=SMALL_V2)
    chief_log, worker_log = _train_two_workers(model_dir, "--epochs=2", small=SMALL_V2)
    assert f"resumed from {model_dir}/checkpoints/ckpt-1 (1 epochs done)" in worker_log
    _check_v2_run(model_dir)
    scratch = model_dir / "workertemp_1"
    for epoch in (0, 1):
        np.testing.assert_array_equal(_assignment(scratch, epoch), _assignment(model_dir, epoch),
                                      err_msg=f"epoch {epoch}")
    np.testing.assert_array_equal(_bank(scratch), _bank(model_dir))
    assert not (scratch / "export").exists()


@pytest.mark.parametrize("tf_config, why", [
    ("{not json", "TF_CONFIG is not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}}', 'no "task"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}',
     "is not in its cluster"),
])
def test_malformed_tf_config_is_a_config_error(monkeypatch, tf_config, why):
    from dc_tf import config, distribute
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(config.ConfigError, match="--strategy=multi_worker") as e:
        distribute.make_strategy("multi_worker")
    assert why in str(e.value) and "set TF_CONFIG on every worker" in str(e.value)


def test_missing_tf_config_fails_with_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
         "--strategy=multi_worker", f"--model_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --strategy=multi_worker: the environment variable TF_CONFIG "
                           "is not set"), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_the_global_batch_must_split_evenly_over_the_replicas():
    from dc_tf import config, distribute
    two_replicas = types.SimpleNamespace(num_replicas_in_sync=2)
    distribute.check_batch_size(two_replicas, 64)
    with pytest.raises(config.ConfigError, match="--batch_size=63: .* multiple of 2"):
        distribute.check_batch_size(two_replicas, 63)
