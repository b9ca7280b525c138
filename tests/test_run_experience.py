"""What a user sees of a run: its console, and its report page opened in a real browser.

One smoke run of `python -m dc_tf.train` (a subprocess, as a user starts it, without
TF_CPP_MIN_LOG_LEVEL), the own-images command of docs/own_images.md on generated class
sub-folders, serves every test but the one of a folder too small for the settings. The report is opened in headless Chromium (Debian's
chromium and chromium-driver, installed by `make test`) through Selenium; a screenshot of the
whole page is kept in build/test-artifacts/report.png.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dc_tf import console

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "build", "test-artifacts")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """(model_dir, console text) of the own-images command of docs/own_images.md, for 2 epochs
    on 90 generated images in three class sub-folders."""
    root = tmp_path_factory.mktemp("photos")
    _own_images(str(root), per_class=30)
    model_dir = str(tmp_path_factory.mktemp("experience") / "run")
    done = subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/folder.cfg",
         f"--dataset=folder:{root}", f"--model_dir={model_dir}", "--epochs=2"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    return model_dir, text


def test_console_has_no_startup_noise_and_ends_on_where_things_are(smoke_run):
    model_dir, text = smoke_run
    for noise in ("cuInit", "absl::InitializeLog", "I0000 00:00", "cpu_feature_guard",
                  "Sharding callback", "signature_serialization", "INFO:tensorflow"):
        assert noise not in text, f"{noise!r} in the console:\n{text[:3000]}"
    closing = text[text.rindex("Finished: DeepCluster on folder:"):]
    assert f"export   {model_dir}/export" in closing
    assert f"report   {model_dir}/report.html" in closing
    assert re.search(r"NMI with the labels 0\.\d{3}", closing)
    for command in ("python -m dc_tf.assign", "python -m dc_tf.clusters",
                    "tensorboard --logdir"):
        assert command in closing
    # Progress is one line per epoch when the output is not a terminal (no Keras bar).
    assert len(re.findall(r"monitor\.py:\d+\] epoch \d: loss", text)) == 2
    assert "8/8" not in text


@pytest.mark.parametrize("line, gpu_driver, kept", [
    ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
     False, False),
    ("I0000 00:00:1796528566.559742    2709 port.cc:153] oneDNN custom operations are on.",
     False, False),
    ("E0000 00:00:1796528573.368097    2709 cuda_platform.cc:52] failed call to cuInit: "
     "INTERNAL: CUDA error", False, False),
    ("E0000 00:00:1796528573.368097    2709 cuda_platform.cc:52] failed call to cuInit: "
     "INTERNAL: CUDA error", True, True),  # a machine with a driver: a real problem
    ("E0000 00:00:1796528573.368097    2709 some_op.cc:12] could not open libfoo.so", False,
     True),
    ("I1206 03:47:11.060647 140016839900032 loader.py:186] Loading faiss.", False, True),
    ("Traceback (most recent call last):", False, True),
])
def test_only_the_startup_noise_is_filtered(line, gpu_driver, kept):
    assert console.keep_startup_line(line, gpu_driver) is kept


def test_report_loads_in_chromium_with_every_image_and_the_epochs(smoke_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    model_dir, _ = smoke_run
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    assert not missing, f"{missing} not installed: run `make test` (it installs Debian's " \
                        "chromium and chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get("file://" + os.path.join(model_dir, "report.html"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        text = driver.find_element("tag name", "body").text
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, height)
        os.makedirs(ARTIFACTS, exist_ok=True)
        assert driver.save_screenshot(os.path.join(ARTIFACTS, "report.png"))
    finally:
        driver.quit()
    assert not errors, errors
    # The training curves, the cluster sizes and the gallery, each decoded by the browser.
    assert len(images) == 3, images
    assert all(complete and width > 0 for _, complete, width in images), images
    assert any("clusters of the final clustering" in alt for alt, _, _ in images)
    epochs = re.findall(r"^([01]) \d+\.\d+ [01]\.?\d* ", text, re.M)  # epoch, loss, accuracy
    assert epochs == ["0", "1"], text[:2000]
    assert "finished, exported to" in text and "Every image was read." in text


def test_report_command_rebuilds_the_page(smoke_run, tmp_path):
    model_dir, _ = smoke_run
    os.remove(os.path.join(model_dir, "report.html"))
    done = subprocess.run([sys.executable, "-m", "dc_tf.report", model_dir], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(model_dir, "report.html"), encoding="utf-8") as f:
        page = f.read()
    assert page.count("data:image/png;base64,") == 3 and "Final clustering" in page
    refused = subprocess.run([sys.executable, "-m", "dc_tf.report", str(tmp_path)], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert f"{tmp_path} holds no dc_tf.train run" in refused.stderr


def _own_images(root, per_class: int) -> None:
    """Class sub-folders of 64 px JPEGs: red discs, blue squares and green stripes on noise."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    for name in ("discs", "squares", "stripes"):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            image = Image.fromarray(rng.integers(0, 80, (64, 64, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(image)
            x, y = rng.integers(8, 24, 2)
            if name == "discs":
                draw.ellipse([x, y, x + 32, y + 32], fill=(220, 40, 40))
            elif name == "squares":
                draw.rectangle([x, y, x + 30, y + 30], fill=(40, 40, 220))
            else:
                for row in range(int(y) % 8, 64, 8):
                    draw.rectangle([0, row, 63, row + 3], fill=(40, 200, 40))
            image.save(os.path.join(root, name, f"{i:03d}.jpg"), quality=90)


def test_own_images_command_gives_a_report_with_the_class_names(smoke_run):
    model_dir, text = smoke_run
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["num_clusters"] == 2  # 90 images: max(2, 90 // 40)
    with open(os.path.join(model_dir, "report.html"), encoding="utf-8") as f:
        page = f.read()
    classes = set(re.findall(r"<td>(discs|squares|stripes)</td>", page))
    assert classes, "no majority class named in the report's cluster table"
    assert "clusters of the final clustering" in page


def test_too_few_own_images_get_one_message_with_every_problem(tmp_path):
    root = str(tmp_path / "few")
    _own_images(root, per_class=2)  # 6 images
    done = subprocess.run(
        [sys.executable, "-m", "dc_tf.train", "--flagfile=flags/folder.cfg",
         f"--dataset=folder:{root}", f"--model_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "--batch_size=64: exceeds the 6 images" in errors[0]
    assert "use at most 6" in errors[0]
    assert "--pca_dim=64: PCA needs at least as many images as dimensions" in errors[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
