"""A full disk while a checkpoint or the export is written: a clear error, nothing lost.

The run's model_dir lives on a small tmpfs mounted by the test in its own mount namespace
(`unshare --map-root-user --mount`, so no privileges are needed); a filler file then takes all
but a few MB of it.
"""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

DRIVER = r"""
import json, os, subprocess, sys
mnt, root = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], check=True)
run_dir = os.path.join(mnt, "run")

def train(epochs):
    r = subprocess.run([sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
                        f"--model_dir={run_dir}", "--max_examples=128", "--num_clusters=4",
                        "--pca_dim=8", "--batch_size=32", f"--epochs={epochs}"],
                       cwd=root, capture_output=True, text=True)
    return {"rc": r.returncode, "tail": r.stderr.strip().splitlines()[-1:]}

def fill(leave_mb):
    # Fill the filesystem, then give back `leave_mb` MB: a checkpoint (~13 MB) or an export
    # (~7 MB) no longer fits, the small files of an epoch still do.
    with open(os.path.join(mnt, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    size = os.path.getsize(os.path.join(mnt, "filler"))
    os.truncate(os.path.join(mnt, "filler"), max(0, size - leave_mb * (1 << 20)))

def state():
    import tensorflow as tf  # here, once: the runs above are separate processes
    index = open(os.path.join(run_dir, "checkpoints", "checkpoint")).read().splitlines()[0]
    try:
        r = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(run_dir,
                                                                             "checkpoints")))
        probe = [str(int(r.get_tensor("epochs_done/.ATTRIBUTES/VARIABLE_VALUE"))),
                 str(len(tf.saved_model.load(os.path.join(run_dir, "export")).signatures))]
        probe_rc = 0
    except Exception as e:  # reported, and the test fails on probe_rc
        probe, probe_rc = [repr(e)], 1
    epochs = [json.loads(l)["epoch"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {"index": index, "probe": probe, "probe_rc": probe_rc, "metrics_epochs": epochs}

out = {"first": train(1), "after_first": state()}
fill(3)
out["checkpoint_full"] = train(2)
out["after_checkpoint_full"] = state()
os.remove(os.path.join(mnt, "filler"))
out["resumed"] = train(2)
out["after_resumed"] = state()
fill(3)
out["export_full"] = train(2)  # every epoch done: only the export is written again
out["after_export_full"] = state()
print("RESULT " + json.dumps(out))
"""


def test_full_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    if not shutil.which("unshare"):
        pytest.skip("needs util-linux unshare to mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(["unshare", "--map-root-user", "--mount", sys.executable, "-c",
                             DRIVER, str(mnt), ROOT], capture_output=True, text=True)
    if "mount" in result.stderr and "Operation not permitted" in result.stderr:
        pytest.skip("this machine forbids mounting a tmpfs even in a user namespace")
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1])

    assert out["first"]["rc"] == 0, out
    assert out["after_first"]["probe"][0] == "1"
    # The second epoch's checkpoint does not fit: a one-line error, ckpt-1 still the latest.
    assert out["checkpoint_full"]["rc"] == 1, out
    assert "is full" in out["checkpoint_full"]["tail"][0], out
    assert "re-run the same command" in out["checkpoint_full"]["tail"][0], out
    after = out["after_checkpoint_full"]
    assert after["index"] == 'model_checkpoint_path: "ckpt-1"', after
    assert after["probe_rc"] == 0 and after["probe"][0] == "1", after
    assert after["metrics_epochs"] == [0, 1]  # logged before the checkpoint failed...
    # ...and dropped again by the resumed run, which redoes epoch 1 once.
    assert out["resumed"]["rc"] == 0, out
    assert out["after_resumed"]["metrics_epochs"] == [0, 1]
    assert out["after_resumed"]["probe"][0] == "2"
    # The export does not fit: a clear error, and the previous export still loads.
    assert out["export_full"]["rc"] == 1, out
    assert "is full" in out["export_full"]["tail"][0], out
    assert out["after_export_full"]["probe_rc"] == 0, out["after_export_full"]
    assert out["after_export_full"]["probe"] == ["2", "3"]
