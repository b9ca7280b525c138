"""Clusters people can use: the index map, the clusters report with links, and assigning new
images with the export."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, folder_smoke_config, write_image
from dc_tf import train
from dc_tf.run_dir import RunDir


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run on nested class folders (class/sub/file) with two corrupt files."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(30):
        write_image(f"{root}/class{i % 3}/batch{i % 2}/img_{i:02d}.png", (36, 36), "RGB", seed=i)
    open(f"{root}/class0/batch0/broken.jpg", "wb").close()
    with open(f"{root}/class2/notes.jpg", "w") as f:
        f.write("not a picture")
    cfg = folder_smoke_config(root, f"{root.parent}/run")
    return root, train.run(cfg)


def _cli(module, *args):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_examples_tsv_maps_every_index_to_its_file(folder_run):
    root, cfg = folder_run
    sources, labels = RunDir(cfg.model_dir).load_examples(32)
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs)
    assert sources == files and len(sources) == 32
    assert labels.tolist() == [int(s.split(os.sep)[0][-1]) for s in sources]
    final = RunDir(cfg.model_dir).load_assignment()
    bad = {sources.index(os.path.join("class0", "batch0", "broken.jpg")),
           sources.index(os.path.join("class2", "notes.jpg"))}
    assert {int(i) for i in np.flatnonzero(final < 0)} == bad


def test_clusters_report_and_links(folder_run, tmp_path):
    root, cfg = folder_run
    out = _cli("dc_tf.clusters", f"--model_dir={cfg.model_dir}", f"--export_to={tmp_path}/links")
    assert "3 non-empty clusters of 32 examples (2 unreadable)" in out
    final = RunDir(cfg.model_dir).load_assignment()
    sources, _ = RunDir(cfg.model_dir).load_examples(32)
    links = {}
    for folder in os.listdir(tmp_path / "links"):
        for name in os.listdir(tmp_path / "links" / folder):
            target = os.readlink(tmp_path / "links" / folder / name)
            links[os.path.relpath(target, root)] = int(folder.split("_")[1])
    assert links == {sources[i]: int(c) for i, c in enumerate(final) if c >= 0}
    assert all(os.path.exists(os.path.join(root, p)) for p in links)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_examples_tsv_is_refused_with_the_way_out(folder_run, tmp_path, damage):
    _, cfg = folder_run
    model_dir = tmp_path / "run"
    shutil.copytree(cfg.model_dir, model_dir, ignore=shutil.ignore_patterns("export"))
    path = model_dir / "examples.tsv"
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        path.write_bytes(b"\xff\xfe garbled")
    result = subprocess.run([sys.executable, "-m", "dc_tf.clusters", f"--model_dir={model_dir}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path} does not list the 32 examples of the assignments (damaged or edited): "
        "re-run the training command of this run, which writes it again")


def test_assign_cli_puts_new_images_into_the_learnt_clusters(folder_run, tmp_path):
    root, cfg = folder_run
    out = _cli("dc_tf.assign", f"--model={cfg.model_dir}/export", f"--input=folder:{root}",
               f"--output={tmp_path}/a.csv")
    assert "assigned 30 images, skipped 2 unreadable" in out
    with open(tmp_path / "a.csv") as f:
        rows = list(csv.DictReader(f))
    final = RunDir(cfg.model_dir).load_assignment()
    sources, _ = RunDir(cfg.model_dir).load_examples(32)
    agree = np.mean([int(r["cluster"]) == final[sources.index(r["file"])] for r in rows])
    assert len(rows) == 30 and agree >= 0.9, agree
    skipped = open(tmp_path / "a.csv.skipped.tsv").read()
    assert "broken.jpg" in skipped and "notes.jpg" in skipped
