"""Every file a run writes goes through a temporary file and a rename (`dc_tf/fileio.py`).

A run of each method on a small folder with an unreadable image (so that `skipped.tsv` is written
too) is watched by a Python audit hook in its own process: every opening for writing under the
run folder, and every rename. Each written file must be `NAME.tmp` renamed over `NAME`, except
the two that are appended to by design: `metrics.jsonl` (one line per write) and the lock file.
TensorFlow's own writers (checkpoints, the SavedModel, TensorBoard events) write from C++ and are
covered by the kill test instead.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_image

APPENDED = {"metrics.jsonl", ".lock"}

_WATCH = r"""
import json, os, runpy, sys
model_dir = os.path.abspath(sys.argv[1])
writes, renames = [], []
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def inside(path):
    path = os.path.abspath(os.fsdecode(path))
    return path if path.startswith(model_dir + os.sep) else None


def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and inside(args[0]):
        mode, flags = args[1], args[2] or 0
        if (mode and any(c in mode for c in "wax+")) or flags & WRITING:
            writes.append((inside(args[0]), mode or ""))
    elif event in ("os.rename", "os.replace") and inside(args[1]):
        renames.append((inside(args[0]), inside(args[1])))


sys.addaudithook(hook)
sys.argv = ["dc_tf.train", *sys.argv[2:]]
try:
    runpy.run_module("dc_tf.train", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print("WATCHED " + json.dumps({"writes": writes, "renames": renames}))
"""

FLAGS = {
    "deepcluster": ["--flagfile=flags/smoke.cfg", "--num_clusters=3", "--pca_dim=8"],
    "deepcluster_v2": ["--flagfile=flags/smoke_v2.cfg", "--num_prototypes=3,3",
                       "--batch_size=8"],
}


@pytest.mark.parametrize("method", list(FLAGS))
def test_every_file_a_run_writes_is_written_whole_then_renamed(tmp_path, method):
    root = tmp_path / "images"
    for i in range(24):
        write_image(f"{root}/class{i % 2}/img_{i:02d}.png", (36, 36), "RGB", seed=i)
    (root / "class0" / "broken.jpg").write_bytes(b"not a picture")
    model_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", _WATCH, str(model_dir), *FLAGS[method],
         f"--dataset=folder:{root}", f"--model_dir={model_dir}", "--max_examples=0",
         "--batch_size=8", "--epochs=2", "--resize_size=36", "--mean=0.5", "--std=0.25"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    watched = json.loads(result.stdout.split("WATCHED ")[-1])
    renamed = {source: target for source, target in watched["renames"]}
    finals = set()
    for path, mode in watched["writes"]:
        name = os.path.relpath(path, model_dir)
        if name in APPENDED:
            assert mode.startswith("a"), (name, mode)
            continue
        assert name.endswith(".tmp") and renamed.get(path) == path[:-len(".tmp")], \
            f"{name} written in place (mode {mode!r})"
        finals.add(os.path.relpath(renamed[path], model_dir))
    # The watch saw the files that were once written in place, and the run's others.
    assert {"config.json", "examples.tsv", "skipped.tsv", "final_clustering.json",
            "final_clustering.npz", os.path.join("assignments", "final.npy"),
            os.path.join("assignments", "epoch_0001.npy")} <= finals, sorted(finals)
