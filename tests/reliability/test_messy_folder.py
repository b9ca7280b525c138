"""A messy image folder: every broken file is skipped, counted and listed with its reason; every
odd but valid file is used; the run completes."""

import io
import json
import os

import numpy as np
from PIL import Image

from conftest import folder_smoke_config, write_image
from dc_core.sources import MAX_IMAGE_PIXELS
from dc_tf import data, train


def _jpeg_bytes(size=(8, 8)) -> bytearray:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(buffer, "JPEG")
    return bytearray(buffer.getvalue())


def _write_messy_folder(root) -> tuple:
    """(files that must be skipped, files that must be used) below root/c0 .. root/c2."""
    rng = np.random.default_rng(0)
    for i in range(24):
        write_image(f"{root}/c{i % 3}/good{i:02d}.jpg", (40 + i, 36), "RGB", seed=i)
    bad, odd = {}, {}

    def path(name):
        return os.path.join(root, "c0", name)

    jpeg = _jpeg_bytes((40, 30))
    open(path("truncated.jpg"), "wb").write(jpeg[:len(jpeg) // 2])
    bad["truncated.jpg"] = "JPEG"
    open(path("zero.jpg"), "wb").close()
    bad["zero.jpg"] = "empty"
    open(path("text.jpg"), "w").write("this is not an image")
    bad["text.jpg"] = "Unknown image file format"
    # A real JPEG whose start-of-frame announces 60000 x 50000 pixels (3e9): refused from the
    # header, before a 9 GB buffer is allocated.
    huge = _jpeg_bytes()
    sof = huge.index(b"\xff\xc0")
    huge[sof + 5:sof + 9] = (60000).to_bytes(2, "big") + (50000).to_bytes(2, "big")
    open(path("huge.jpg"), "wb").write(huge)
    bad["huge.jpg"] = f"MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}"
    os.symlink("loop_b.jpg", path("loop_a.jpg"))  # a symlink loop between two "images"
    os.symlink("loop_a.jpg", path("loop_b.jpg"))
    bad["loop_a.jpg"] = bad["loop_b.jpg"] = "ymbolic links"
    os.symlink(os.path.join(root, "c1"), os.path.join(root, "c1", "again"))  # a folder loop

    def rgb():
        return Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16)).save(path("deep16.png"))
    rgb().convert("CMYK").save(path("cmyk.jpg"))
    rgb().convert("L").save(path("gray.jpg"))
    rgb().convert("RGBA").save(path("alpha.png"))
    rgb().save(path("animated.gif"), save_all=True, append_images=[rgb(), rgb()])
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(path("one_pixel.png"))
    rgb().save(path("ünïcødé_画像.jpg"))
    odd.update({name: "" for name in ("deep16.png", "cmyk.jpg", "gray.jpg", "alpha.png",
                                      "animated.gif", "one_pixel.png", "ünïcødé_画像.jpg")})
    # Unreadable permissions: skipped as any unreadable file, unless this runs as root, whom
    # permissions do not stop (then the file is simply used).
    write_image(path("locked.jpg"), (40, 30), "RGB", seed=99)
    os.chmod(path("locked.jpg"), 0)
    (odd if os.geteuid() == 0 else bad)["locked.jpg"] = "ermission"
    return bad, odd


def test_messy_folder_skips_and_lists_every_bad_file(tmp_path):
    root = tmp_path / "images"
    bad, odd = _write_messy_folder(root)
    cfg = train.run(folder_smoke_config(root, f"{tmp_path}/run", "--epochs=1"))
    source = data.open_source(cfg.dataset)
    assert cfg.num_examples == 24 + len(bad) + len(odd) == source.num_examples

    rows = [line.split("\t") for line in
            open(f"{cfg.model_dir}/skipped.tsv", encoding="utf-8").read().splitlines()]
    assert rows[0] == ["index", "source", "reason"]
    skipped = {os.path.basename(r[1]): r[2] for r in rows[1:]}
    assert set(skipped) == set(bad), (skipped, bad)
    for name, words in bad.items():
        assert words in skipped[name], (name, skipped[name])
    metrics = json.loads(open(f"{cfg.model_dir}/metrics.jsonl").readline())
    assert metrics["skipped_images"] == len(bad)

    labels = np.load(f"{cfg.model_dir}/assignments/epoch_0000.npy")
    used = [i for i, p in enumerate(source.paths) if os.path.basename(p) not in bad]
    assert (labels[used] >= 0).all() and (np.delete(labels, used) == -1).all()
    assert {os.path.basename(source.paths[i]) for i in used} >= set(odd)
