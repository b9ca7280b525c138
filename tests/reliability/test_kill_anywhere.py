"""SIGKILL a run at 25 places across every phase, re-running the same command after each kill.

Each kill comes from a failpoint (dc_tf/failpoints.py): the process kills itself with SIGKILL
the N-th time it reaches a named place, so every phase is hit for certain — the feature pass,
PCA, k-means, the assignment file, mid-epoch, between the metrics line and the checkpoint,
between a checkpoint's files and its index, after the index, the final clustering and both
halves of the export. Whatever was cut off, the next run resumes from the last complete
checkpoint; at the end every epoch appears exactly once and nothing is missing.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import tensorflow as tf

from conftest import ROOT
from dc_tf import failpoints

EPOCHS = 3
# Batch 256, the feature pass's batch too (dc_tf.train.feature_batch_size): 6 batches per feature
# pass and 6 training steps per epoch, so every kill below lands where its comment says.
NUM_EXAMPLES = 1536
ARGS = [f"--max_examples={NUM_EXAMPLES}", "--num_clusters=4", "--pca_dim=8", "--batch_size=256",
        f"--epochs={EPOCHS}"]
STEPS = 6  # ceil(1536 / 256)

# The N in NAME:N counts from the start of each process, and every re-run starts again at the
# beginning of the epoch after the last complete checkpoint: one killed between its files and
# its index is complete (its files load), so that re-run goes on with the following epoch.
KILLS = [
    # epoch 0, from a fresh model_dir
    "run.locked", "run.config_written", "features.batch:1", "features.batch:4", "pca.fitted",
    "kmeans.started", "kmeans.done", "assignment.saved", "train.batch:1", "train.batch:4",
    "epoch.logged", "checkpoint.saved",
    # epoch 1
    "features.batch:3", "kmeans.done", "assignment.saved", "train.batch:2", "epoch.logged",
    "checkpoint.written",
    # epoch 2, the final clustering and the export
    "pca.fitted", "train.batch:5", "checkpoint.saved", "features.batch:2", "final.saved",
    "export.written", "export.done",
]


def _run(model_dir, failpoint=""):
    env = {**os.environ, failpoints.ENV: failpoint}
    return subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
         f"--model_dir={model_dir}", *ARGS],
        cwd=ROOT, env=env, capture_output=True, text=True)


def test_failpoint_names_are_checked():
    env = {**os.environ, failpoints.ENV: "no.such.place"}
    result = subprocess.run([sys.executable, "-c", "import dc_tf.failpoints"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "expected NAME[:N]" in result.stderr


def test_killed_anywhere_the_same_command_finishes_the_run(tmp_path):
    model_dir = tmp_path / "run"
    assert {k.partition(":")[0] for k in KILLS} == set(failpoints.POINTS)
    for kill in KILLS:
        result = _run(model_dir, kill)
        assert result.returncode == -signal.SIGKILL, (
            f"{kill}: the run was not killed there (rc {result.returncode})\n"
            + result.stderr[-3000:])
    result = _run(model_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
    assert [row["epoch"] for row in rows] == list(range(EPOCHS))
    assert all(row["steps"] == STEPS for row in rows), [row["steps"] for row in rows]
    for name in [f"epoch_{e:04d}.npy" for e in range(EPOCHS)] + ["final.npy"]:
        labels = np.load(model_dir / "assignments" / name)
        assert labels.shape == (NUM_EXAMPLES,) and labels.min() >= 0, name
    assert json.load(open(model_dir / "final_clustering.json"))["epochs"] == EPOCHS
    latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    assert latest.endswith(f"ckpt-{EPOCHS}")
    assert int(tf.train.load_checkpoint(latest).get_tensor(
        "epochs_done/.ATTRIBUTES/VARIABLE_VALUE")) == EPOCHS
    export = tf.saved_model.load(str(model_dir / "export"))
    out = export.signatures["assign"](images=tf.zeros([2, 32, 32, 1], tf.uint8))
    assert out["cluster"].shape == (2,)
