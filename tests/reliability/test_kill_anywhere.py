"""SIGKILL a run at 25 places across every phase, re-running the same command after each kill.

Each kill comes from a failpoint (dc_tf/failpoints.py): the process kills itself with SIGKILL
the N-th time it reaches a named place, so every phase is hit for certain — the feature pass,
PCA, k-means, the assignment file, mid-epoch, between the metrics line and the checkpoint,
between a checkpoint's files and its index, after the index, the final clustering and both
halves of the export. Whatever was cut off, the next run resumes from the last complete
checkpoint; at the end every epoch appears exactly once and nothing is missing. The kills of
epoch 0 and those of the later epochs run side by side in two folders.
"""

import json
import os
import signal
import subprocess
import sys

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from conftest import ROOT
from dc_tf import failpoints

EPOCHS = 3
# Batch 256, the feature pass's batch too (pipelines.feature_batch_size): 6 batches per feature
# pass and 6 training steps per epoch, so every kill below lands where its comment says.
NUM_EXAMPLES = 1536
ARGS = [f"--max_examples={NUM_EXAMPLES}", "--num_clusters=4", "--pca_dim=8", "--batch_size=256"]
STEPS = 6  # ceil(1536 / 256)

# The N in NAME:N counts from the start of each process, and every re-run starts again at the
# beginning of the epoch after the last complete checkpoint: one killed between its files and
# its index is complete (its files load), so that re-run goes on with the following epoch.
# Two folders take the kills side by side (a re-run spends most of its time starting up on one
# core): the first from scratch, the second from a finished 1-epoch run extended to EPOCHS, so
# its first re-run starts at epoch 1 as it would after the first folder's last kill.
KILLS_FROM_SCRATCH = [
    # epoch 0, from a fresh model_dir
    "run.locked", "run.config_written", "features.batch:1", "features.batch:4", "pca.fitted",
    "kmeans.started", "kmeans.done", "assignment.saved", "train.batch:1", "train.batch:4",
    "epoch.logged", "checkpoint.saved",
]
KILLS_AFTER_EPOCH_0 = [
    # epoch 1
    "features.batch:3", "kmeans.done", "assignment.saved", "train.batch:2", "epoch.logged",
    "checkpoint.written",
    # epoch 2, the final clustering and the export
    "pca.fitted", "train.batch:5", "checkpoint.saved", "features.batch:2", "final.saved",
    "export.written", "export.done",
]


def _run(model_dir, failpoint="", epochs=EPOCHS):
    env = {**os.environ, failpoints.ENV: failpoint}
    return subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
         f"--model_dir={model_dir}", *ARGS, f"--epochs={epochs}"],
        cwd=ROOT, env=env, capture_output=True, text=True)


def _kill_then_finish(model_dir, kills, first_epochs: int = 0) -> list:
    """Runs the command once per kill, then once to the end (after a run of `first_epochs`
    epochs, if any); the failures found."""
    failures = []
    if first_epochs:
        result = _run(model_dir, epochs=first_epochs)
        if result.returncode != 0:
            return [f"the {first_epochs}-epoch run failed\n" + result.stderr[-3000:]]
    for kill in kills:
        result = _run(model_dir, kill)
        if result.returncode != -signal.SIGKILL:
            failures.append(f"{kill}: the run was not killed there (rc {result.returncode})\n"
                            + result.stderr[-3000:])
    result = _run(model_dir)
    if result.returncode != 0:
        failures.append(f"the last run of {model_dir} failed\n" + result.stderr[-3000:])
    return failures


def test_failpoint_names_are_checked():
    env = {**os.environ, failpoints.ENV: "no.such.place"}
    result = subprocess.run([sys.executable, "-c", "import dc_tf.failpoints"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "expected NAME[:N]" in result.stderr


def test_killed_anywhere_the_same_command_finishes_the_run(tmp_path):
    kills = KILLS_FROM_SCRATCH + KILLS_AFTER_EPOCH_0
    assert len(kills) == 25 and {k.partition(":")[0] for k in kills} == set(failpoints.POINTS)
    scratch, extended = tmp_path / "scratch", tmp_path / "extended"
    with ThreadPoolExecutor(2) as pool:
        failures = sum(pool.map(_kill_then_finish, (scratch, extended),
                                (KILLS_FROM_SCRATCH, KILLS_AFTER_EPOCH_0), (0, 1)), [])
    assert not failures, "\n\n".join(failures)
    for model_dir in (scratch, extended):
        _assert_finished_once(model_dir)


def _assert_finished_once(model_dir):
    """Every epoch trained and logged once, the final clustering and export of EPOCHS epochs."""
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
