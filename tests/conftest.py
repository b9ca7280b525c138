"""Shared test helpers: configurations from the real flagfiles, and image folders on disk."""

import os

import numpy as np
import pytest
from absl.testing import flagsaver

from dc_tf import config, train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_from_flagfile(flagfile: str, *args: str) -> config.TrainConfig:
    """Parses `--flagfile=flags/<flagfile> args...` exactly as the command line would."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # flagfiles include each other by paths relative to the project root
    try:
        with flagsaver.flagsaver():
            return train_flags.config_from_argv(
                ["dc_tf.train", f"--flagfile=flags/{flagfile}", *args])
    finally:
        os.chdir(cwd)


def folder_smoke_config(root, model_dir, *args: str) -> config.TrainConfig:
    """flags/smoke.cfg on a small folder of images: every file, k=3, PCA to 8, one epoch."""
    return config_from_flagfile(
        "smoke.cfg", f"--dataset=folder:{root}", f"--model_dir={model_dir}", "--max_examples=0",
        "--num_clusters=3", "--pca_dim=8", "--batch_size=8", "--epochs=1", "--resize_size=36",
        "--mean=0.5", "--std=0.25", *args)


def write_image(path: str, size=(40, 30), mode="RGB", fmt=None, seed=0) -> str:
    """Writes a random image with PIL in the given mode and format (from the extension)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        array = rng.integers(0, 65535, (h, w), dtype=np.uint16).astype("<u2")
    else:
        bands = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        array = rng.integers(0, 255, (h, w, bands), dtype=np.uint8)
    image = Image.frombytes(mode, (w, h), array.tobytes())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def smoke_config(tmp_path):
    """flags/smoke.cfg with a temporary model_dir, plus any overrides."""
    def make(*args: str) -> config.TrainConfig:
        return config_from_flagfile("smoke.cfg", f"--model_dir={tmp_path / 'run'}", *args)
    return make
