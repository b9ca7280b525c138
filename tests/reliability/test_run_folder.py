"""A damaged run folder: re-running the same command resumes without losing a trained epoch, or
refuses in one line that says why and how to get out.

One finished 3-epoch run per method is trained; each case damages a copy of it (a file garbled,
truncated or deleted) and re-runs the command that trained it, through the command line, as a
user would. A re-run spends most of its time starting up on one core, so the module fixture
runs the re-runs of the selected cases two at a time; each test then checks its own.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT

EPOCHS = 3
NUM_EXAMPLES = 512
FLAGS = {"deepcluster": ["--flagfile=flags/smoke.cfg", "--num_clusters=4", "--pca_dim=8"],
         "deepcluster_v2": ["--flagfile=flags/smoke_v2.cfg"]}
GARBAGE = b"\xff\xfe\x00garbled\x81"  # not UTF-8, not JSON


def _train(model_dir, method: str, epochs: int = EPOCHS, args: tuple = ()
           ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dc_tf.train", *FLAGS[method], f"--model_dir={model_dir}",
         f"--max_examples={NUM_EXAMPLES}", "--batch_size=64", f"--epochs={epochs}", *args],
        cwd=ROOT, capture_output=True, text=True)


# ---------------------------------------------------------------- damage
def _garble(name: str) -> Callable[[str], None]:
    def damage(model_dir):
        with open(os.path.join(model_dir, name), "wb") as f:
            f.write(GARBAGE)
    return damage


def _truncate(name: str) -> Callable[[str], None]:
    def damage(model_dir):
        path = os.path.join(model_dir, name)
        os.truncate(path, os.path.getsize(path) // 2)
    return damage


def _delete(name: str) -> Callable[[str], None]:
    def damage(model_dir):
        path = os.path.join(model_dir, name)
        (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
    return damage


def _garble_line(line: int) -> Callable[[str], None]:
    """Garbles metrics.jsonl's line `line` (0-based; -1: the last), as a torn or bit-rotten
    write leaves it."""
    def damage(model_dir):
        path = os.path.join(model_dir, "metrics.jsonl")
        with open(path, "rb") as f:
            lines = f.readlines()
        lines[line] = lines[line][:20] + GARBAGE + b"\n"
        with open(path, "wb") as f:
            f.writelines(lines)
    return damage


def _all_checkpoints_truncated(model_dir):
    for name in os.listdir(os.path.join(model_dir, "checkpoints")):
        if ".data-" in name:
            _truncate(os.path.join("checkpoints", name))(model_dir)


# ---------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """A copy of `method`'s finished run damaged by `damages`, re-run for `epochs` with `args`,
    and what the re-run must do (for the damaged-folder test)."""
    method: str
    damages: tuple = ()
    epochs: int = EPOCHS
    args: tuple = ()
    restored: Optional[int] = EPOCHS  # the epochs it resumes after; None: it must refuse
    metrics: Optional[list] = None  # metrics.jsonl's epochs afterwards (None: each epoch once)
    says: tuple = ()  # words its log (or its refusal) must hold


DAMAGED = {
    # The `checkpoint` index lost: the checkpoints are found from their own files. With it, the
    # assignment before the resumed epoch, which only gives nmi_prev, is damaged (reported, and
    # done without), and so is the index map (written again).
    "index_garbled": Case("deepcluster", (_garble("checkpoints/checkpoint"),
                                          _garble("assignments/epoch_0002.npy"),
                                          _garble("examples.tsv")),
                          says=("resuming from ckpt-3", "epoch_0002.npy does not read",
                                "examples.tsv does not list the 512 images")),
    "index_deleted": Case("deepcluster_v2", (_delete("checkpoints/checkpoint"),
                                             _truncate("assignments/epoch_0002.npy"),
                                             _truncate("examples.tsv")),
                          epochs=4, says=("resuming from ckpt-3", "epoch_0002.npy does not read",
                                          "examples.tsv does not list the 512 images")),
    # The newest checkpoint does not load: the one before it does, and the epoch after it is
    # trained again.
    "newest_data_truncated": Case(
        "deepcluster", (_truncate("checkpoints/ckpt-3.data-00000-of-00001"),), restored=2,
        says=("ckpt-3 does not load", "resuming from ckpt-2")),
    "newest_index_truncated": Case(
        "deepcluster_v2", (_truncate("checkpoints/ckpt-3.index"),), restored=2,
        says=("ckpt-3 does not load", "resuming from ckpt-2")),
    # A garbled metrics line is dropped, and named.
    "metrics_last_line_garbled": Case("deepcluster", (_garble_line(-1),), metrics=[0, 1],
                                      says=("metrics.jsonl line 3",)),
    "metrics_middle_line_garbled": Case("deepcluster_v2", (_garble_line(1),), epochs=4,
                                        metrics=[0, 2, 3], says=("metrics.jsonl line 2",)),
    # Without a readable config.json the flags cannot be checked against the run's.
    "config_garbled": Case("deepcluster", (_garble("config.json"),), restored=None,
                           says=("config.json", "--overwrite")),
    "config_deleted": Case("deepcluster_v2", (_delete("config.json"),), restored=None,
                           says=("config.json", "--overwrite")),
    # A damaged final clustering is computed again from the last checkpoint.
    "final_json_garbled": Case("deepcluster", (_garble("final_clustering.json"),),
                               says=("final_clustering.json does not read",)),
    "final_npz_truncated": Case("deepcluster_v2", (_truncate("final_clustering.npz"),),
                                says=("final_clustering.npz does not read",)),
    "final_npy_truncated": Case("deepcluster", (_truncate("assignments/final.npy"),),
                                says=("final.npy does not read",)),
}
NO_CHECKPOINT = {
    "all_checkpoints_truncated": Case("deepcluster", (_all_checkpoints_truncated,)),
    # metrics.jsonl still lists 3 epochs
    "checkpoints_deleted": Case("deepcluster_v2", (_delete("checkpoints"),)),
}
OVERWRITE = {
    "overwrite_unloadable_checkpoints": Case("deepcluster", (_all_checkpoints_truncated,),
                                             epochs=1, args=("--overwrite",)),
    "overwrite_garbled_config": Case(
        "deepcluster_v2", (_garble("config.json"), _truncate("metrics.jsonl")), epochs=1,
        args=("--overwrite",)),
}
FEWER_EPOCHS = {"fewer_epochs": Case("deepcluster", epochs=2),
                "fewer_epochs_v2": Case("deepcluster_v2", epochs=1)}
CASES = {**DAMAGED, **NO_CHECKPOINT, **OVERWRITE, **FEWER_EPOCHS}


@dataclasses.dataclass
class Rerun:
    """A case's re-run: its folder, the folder's _snapshot before it, and what it printed."""
    model_dir: str
    before: dict
    result: subprocess.CompletedProcess


def _snapshot(model_dir) -> dict:
    """Every file of the folder (the lock aside) -> its size and modification time."""
    files = {}
    for root, _, names in os.walk(model_dir):
        for name in names:
            path = os.path.join(root, name)
            if name != ".lock":
                files[os.path.relpath(path, model_dir)] = (os.path.getsize(path),
                                                           os.stat(path).st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def reruns(request, tmp_path_factory) -> dict:
    """Case name -> its Rerun, for the cases of the tests selected in this module."""
    names = [item.callspec.params["name"] for item in request.session.items
             if item.module is request.module and hasattr(item, "callspec")]
    # Folders made here, not in the threads: tmp_path_factory is not thread-safe.
    finished = {method: tmp_path_factory.mktemp(method) / "run"
                for method in sorted({CASES[name].method for name in names})}
    copies = {name: str(tmp_path_factory.mktemp(name) / "run") for name in names}

    def finish(method):
        result = _train(finished[method], method)
        assert result.returncode == 0, result.stderr[-3000:]

    def rerun(name):
        case, model_dir = CASES[name], copies[name]
        shutil.copytree(finished[case.method], model_dir)
        for damage in case.damages:
            damage(model_dir)
        before = _snapshot(model_dir)
        return Rerun(model_dir, before, _train(model_dir, case.method, case.epochs, case.args))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(finish, finished))
        return dict(zip(names, pool.map(rerun, names)))


# ---------------------------------------------------------------- checks
def _metrics_epochs(model_dir) -> list:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


def _assert_refused(rerun: Rerun, *words: str) -> None:
    """Exit code 1, no traceback, one `error:` line naming the folder and holding `words`, and
    the folder untouched."""
    result = rerun.result
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for word in (rerun.model_dir, *words):
        assert word in last, (word, last)
    assert _snapshot(rerun.model_dir) == rerun.before


def _assert_finished(rerun: Rerun, epochs: int) -> None:
    """The checkpoint, the final clustering and the export all belong to `epochs` epochs."""
    model_dir, result = rerun.model_dir, rerun.result
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(f"{model_dir}/checkpoints"))
    assert int(reader.get_tensor("epochs_done/.ATTRIBUTES/VARIABLE_VALUE")) == epochs
    with open(os.path.join(model_dir, "final_clustering.json")) as f:
        assert json.load(f)["epochs"] == epochs
    with np.load(os.path.join(model_dir, "final_clustering.npz")) as f:
        assert int(f["epochs"]) == epochs
        np.testing.assert_array_equal(
            f["labels"], np.load(os.path.join(model_dir, "assignments", "final.npy")))
    with open(os.path.join(model_dir, "examples.tsv"), encoding="utf-8") as f:
        assert [line.split("\t")[0] for line in f.read().splitlines()] == [
            "index", *map(str, range(NUM_EXAMPLES))]
    export = tf.saved_model.load(os.path.join(model_dir, "export"))
    assert export.signatures["assign"](images=tf.zeros([2, 32, 32, 1], tf.uint8))[
        "cluster"].shape == (2,)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_run_folder_resumes_or_says_why_not(reruns, name):
    case, rerun = CASES[name], reruns[name]
    if case.restored is None:
        _assert_refused(rerun, *case.says)
        return
    _assert_finished(rerun, case.epochs)
    checkpoints = os.path.join(rerun.model_dir, "checkpoints")
    assert (f"resumed from {checkpoints}/ckpt-{case.restored} ({case.restored} epochs done)"
            in rerun.result.stderr), rerun.result.stderr[-3000:]
    assert _metrics_epochs(rerun.model_dir) == (case.metrics or list(range(case.epochs)))
    for words in case.says:
        assert words in rerun.result.stderr, (words, rerun.result.stderr[-3000:])


@pytest.mark.parametrize("name", list(NO_CHECKPOINT))
def test_no_usable_checkpoint_is_refused_not_trained_from_scratch(reruns, name):
    _assert_refused(reruns[name], "no checkpoint of it that loads", "--overwrite")


@pytest.mark.parametrize("name", list(OVERWRITE))
def test_overwrite_starts_anew_whatever_the_folder_holds(reruns, name):
    rerun = reruns[name]
    _assert_finished(rerun, 1)
    assert "resumed from" not in rerun.result.stderr
    assert _metrics_epochs(rerun.model_dir) == [0]
    with open(os.path.join(rerun.model_dir, "config.json")) as f:
        assert json.load(f)["epochs"] == 1
    assert sorted(os.listdir(os.path.join(rerun.model_dir, "assignments"))) == [
        "epoch_0000.npy", "final.npy"]


@pytest.mark.parametrize("name", list(FEWER_EPOCHS))
def test_fewer_epochs_than_trained_are_refused(reruns, name):
    _assert_refused(reruns[name], f"--epochs={CASES[name].epochs} is below the {EPOCHS} epochs "
                    "already trained", "--overwrite")
