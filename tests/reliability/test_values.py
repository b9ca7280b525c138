"""Every bad flag value is refused before any work, in one line that names the value and the fix.

The values below all used to pass `config.validate` and fail later: non-finite numbers trained to a
useless export with exit code 0, some seeds failed inside numpy or only at the final clustering,
and a --model_dir that cannot hold a run failed with a traceback once the data had been loaded.
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, config_from_flagfile, write_image
from dc_tf import config


@pytest.mark.parametrize("flagfile, flag, message", [
    ("smoke.cfg", "--learning_rate=inf", "--learning_rate=inf: must be a finite number"),
    ("smoke.cfg", "--weight_decay=inf", "--weight_decay=inf: must be a finite number"),
    ("smoke.cfg", "--mean=nan", "--mean=nan: must be a finite number"),
    ("smoke.cfg", "--std=inf", "--std=inf: must be a finite number"),
    ("smoke.cfg", "--crop_ratio=0.75,inf", "--crop_ratio=0.75,inf: must be a finite number"),
    ("smoke_v2.cfg", "--temperature=inf", "--temperature=inf: must be a finite number"),
    ("smoke_v2.cfg", "--local_crop_scale=0.05,nan", "--local_crop_scale=0.05,nan: must be a"),
])
def test_non_finite_numbers_are_refused(tmp_path, flagfile, flag, message):
    with pytest.raises(config.ConfigError, match=message):
        config_from_flagfile(flagfile, f"--model_dir={tmp_path / 'run'}", flag)


@pytest.mark.parametrize("seed", [-1, 2**31 - 1, 2**31 - 3])
def test_seeds_that_a_derived_seed_cannot_take_are_refused(tmp_path, seed):
    # smoke.cfg trains 2 epochs: the k-means seeds are seed, seed + 1 and seed + 2 (final).
    with pytest.raises(config.ConfigError, match=rf"--seed={seed}: needs 0 <= seed < "):
        config_from_flagfile("smoke.cfg", f"--model_dir={tmp_path / 'run'}", f"--seed={seed}")
    assert config_from_flagfile("smoke.cfg", f"--model_dir={tmp_path / 'run'}",
                                f"--seed={2**31 - 4}").seed == 2**31 - 4


@pytest.mark.parametrize("flag", ["--image_size=4096", "--resize_size=100000"])
def test_image_sides_that_would_take_gigabytes_are_refused(tmp_path, flag):
    with pytest.raises(config.ConfigError, match=rf"{flag}: above 2048 px"):
        config_from_flagfile("smoke.cfg", f"--model_dir={tmp_path / 'run'}", flag,
                             "--resize_size=100000")


def _train(*args):
    flagfile = ([] if any(a.startswith("--flagfile=") for a in args)
                else ["--flagfile=flags/smoke.cfg"])
    return subprocess.run([sys.executable, "-m", "dc_tf.train", *flagfile, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _refused(result, message):
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last


@pytest.mark.parametrize("where, message", [
    ("a_file", "is a file, not a folder"),
    ("a_file/run", "is a file, not a folder"),
    ("/proc/1/dc_tf_run", "cannot create it"),
])
def test_a_model_dir_that_cannot_hold_a_run_is_refused_before_the_data(tmp_path, where, message):
    (tmp_path / "a_file").write_text("not a folder")
    model_dir = where if os.path.isabs(where) else str(tmp_path / where)
    # A dataset that does not exist: the model_dir's error must come first.
    result = _train(f"--model_dir={model_dir}", f"--dataset=folder:{tmp_path / 'no_images'}")
    _refused(result, f"--model_dir={model_dir}: ")
    assert message in result.stderr.strip().splitlines()[-1]


READ_ONLY_DRIVER = r"""
import subprocess, sys
mnt = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", mnt], check=True)
r = subprocess.run([sys.executable, "-m", "dc_tf.train", "--flagfile=flags/smoke.cfg",
                    f"--model_dir={mnt}/{sys.argv[2]}", "--dataset=folder:/nonexistent"],
                   capture_output=True, text=True, timeout=300)
sys.stdout.write(str(r.returncode) + "\n" + r.stderr)
"""


@pytest.mark.parametrize("inside", ["run", "."])
def test_a_read_only_model_dir_is_refused_before_the_data(tmp_path, inside):
    """On a read-only filesystem (a tmpfs mounted read-only in the test's own mount namespace):
    a new folder cannot be created, an existing one cannot be written."""
    if subprocess.run(["unshare", "--map-root-user", "--mount", "true"]).returncode != 0:
        pytest.skip("unshare --map-root-user --mount is not permitted here")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    out = subprocess.run(["unshare", "--map-root-user", "--mount", sys.executable, "-c",
                          READ_ONLY_DRIVER, str(mnt), inside],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    code, *stderr = out.stdout.splitlines()
    assert code == "1" and "Traceback" not in out.stdout, out.stdout[-2000:]
    last = stderr[-1]
    assert last.startswith(f"error: --model_dir={mnt}/{inside}: cannot ") and (
        "Read-only file system" in last), last


def _mostly_broken_folder(root, good, broken):
    """`good` real JPEGs and `broken` files that are named like images but do not decode."""
    for i in range(good):
        write_image(f"{root}/c{i % 2}/img{i:02d}.jpg", (40, 36), "RGB", seed=i)
    for i in range(broken):
        with open(f"{root}/c{i % 2}/broken{i:02d}.png", "w") as f:
            f.write("not an image")


@pytest.mark.parametrize("flagfile, args, message", [
    # 12 files pass the file-count checks; 5 decode, fewer than k = 6 and the PCA's 8 dims.
    ("smoke.cfg", ["--num_clusters=6", "--pca_dim=8", "--batch_size=4"],
     "--num_clusters=6: exceeds the 5 readable images of --dataset=folder:"),
    ("smoke.cfg", ["--num_clusters=3", "--pca_dim=8", "--batch_size=4"],
     "--pca_dim=8: PCA needs at least as many images as dimensions but only 5"),
    ("smoke_v2.cfg", ["--num_prototypes=6,3", "--batch_size=4", "--projection_dims=16,8"],
     "--num_prototypes=6,3: a head has more prototypes than the 5 readable images"),
    ("smoke_v2.cfg", ["--num_prototypes=3,3", "--batch_size=8", "--projection_dims=16,8"],
     "--batch_size=8: exceeds the 5 readable images"),
])
def test_the_data_checks_count_readable_images(tmp_path, flagfile, args, message):
    root = tmp_path / "images"
    _mostly_broken_folder(root, good=5, broken=7)
    result = _train(f"--flagfile=flags/{flagfile}", f"--dataset=folder:{root}",
                    f"--model_dir={tmp_path / 'run'}", "--max_examples=0", "--epochs=1",
                    "--resize_size=36", "--mean=0.5", "--std=0.25", *args)
    _refused(result, message)
