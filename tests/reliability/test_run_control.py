"""Preemption, one run per model_dir, --overwrite, and determinism of the first clustering."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from dc_tf import config, resume, train


def _epochs(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f if line.strip()]


@pytest.mark.parametrize("flagfile", ["smoke.cfg", "smoke_v2.cfg"])
def test_sigterm_saves_a_checkpoint_and_the_next_run_continues(tmp_path, flagfile):
    model_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "dc_tf.train", f"--flagfile=flags/{flagfile}",
           f"--model_dir={model_dir}", "--epochs=2", "--max_examples=2048"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    first = model_dir / "assignments" / "epoch_0000.npy"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # inside epoch 0's training steps
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert _epochs(model_dir) == [0]
    row = json.loads((model_dir / "metrics.jsonl").read_text())
    assert 0 < row["steps"] <= 32  # 2048 images / 64 per batch; usually fewer: interrupted
    assert 'model_checkpoint_path: "ckpt-1"' in (model_dir / "checkpoints" / "checkpoint").read_text()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _epochs(model_dir) == [0, 1]


def test_a_second_run_on_the_same_model_dir_is_refused(smoke_config):
    cfg = smoke_config()
    with resume.RunLock(cfg.model_dir):
        result = subprocess.run(
            [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
             f"--model_dir={cfg.model_dir}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"is in use by another run (PID {os.getpid()})" in result.stderr


def test_overwrite_replaces_a_run_with_another_configuration(smoke_config):
    train.run(smoke_config("--epochs=1"))
    with pytest.raises(config.ConfigError, match="--overwrite"):
        train.run(smoke_config("--epochs=1", "--num_clusters=12"))
    cfg = train.run(smoke_config("--epochs=1", "--num_clusters=12"), overwrite=True)
    assert json.load(open(os.path.join(cfg.model_dir, "config.json")))["num_clusters"] == 12
    assert _epochs(cfg.model_dir) == [0]
    assert np.load(os.path.join(cfg.model_dir, "assignments", "epoch_0000.npy")).max() == 11


def test_same_seed_gives_the_same_first_assignment(smoke_config):
    cfg = smoke_config("--epochs=1")
    first = train.run(cfg)
    second = train.run(dataclasses.replace(cfg, model_dir=cfg.model_dir + "_again"))
    a, b = (np.load(os.path.join(c.model_dir, "assignments", "epoch_0000.npy"))
            for c in (first, second))
    np.testing.assert_array_equal(a, b)
