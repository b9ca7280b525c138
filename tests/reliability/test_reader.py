"""The image reader never hangs or explodes (issue 24): files that are no regular files, files that
vanish or become unreadable while a run reads them, images whose header announces too many pixels
in any format the decoder opens, images of extreme aspect ratio and file names that are not UTF-8
are skipped with a reason, or used, and a run whose images vanish stops with a message.

Whatever could hang or take the machine's memory on a broken reader runs in a child process with
a hard timeout and a capped address space, so that a regression fails its test instead of
stalling or swapping CI.
"""

import io
import json
import os
import stat
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import ROOT, write_image
from dc_core.fileio import from_printable
from dc_core.sources import MAX_FILE_BYTES, MAX_IMAGE_PIXELS

TIMEOUT_S = 120
ADDRESS_SPACE = 6 << 30  # a TF process takes about 3 GB of it; a reader that explodes, far more
SMOKE_FLAGS = ["--flagfile=flags/smoke.cfg", "--max_examples=0", "--num_clusters=3",
               "--pca_dim=8", "--batch_size=8", "--epochs=1", "--resize_size=36", "--mean=0.5",
               "--std=0.25"]


def _in_child(function, *args, timeout: float = TIMEOUT_S):
    """What function(*args), a function of this module, returns when run in a fresh Python
    process, with a hard timeout and an address space of ADDRESS_SPACE."""
    code = ("import json, resource, sys; "
            f"resource.setrlimit(resource.RLIMIT_AS, ({ADDRESS_SPACE}, {ADDRESS_SPACE})); "
            "import test_reader; "
            f"print(json.dumps(test_reader.{function.__name__}(*json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "tests"), os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _train(*args: str, timeout: float = 2 * TIMEOUT_S, driver: str = ""):
    """`python -m dc_tf.train` on flags/smoke.cfg (or `driver`'s code in its place), with a hard
    timeout and an address space of ADDRESS_SPACE."""
    command = ["-c", driver] if driver else ["-m", "dc_tf.train"]
    return subprocess.run(
        ["bash", "-c", 'ulimit -v "$0" && exec "$@"', str(ADDRESS_SPACE >> 10), sys.executable,
         *command, *SMOKE_FLAGS, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _good_images(root, n: int) -> list:
    """n small JPEGs in root/c0 .. root/c2; their paths relative to root."""
    return [os.path.relpath(write_image(f"{root}/c{i % 3}/good{i:02d}.jpg", (40 + i, 36),
                                        seed=i), root) for i in range(n)]


def _rows(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [line.split("\t") for line in f.read().splitlines()[1:]]


# ---------------------------------------------------------------- run in the child processes

def _child_read_folder(root: str, out: str) -> dict:
    """The feature pass over folder:root, as a run reads it: the files it used and their decoded
    [H, W, C], and skipped.tsv and examples.tsv as a run writes them."""
    import tensorflow as tf
    from dc_tf import data
    from dc_tf.data import pipelines
    source = data.open_source(f"folder:{root}")
    seen = [int(i) for _, idx, _ in pipelines.feature_dataset(source, 36, 32, 8)
            .as_numpy_iterator() for i in idx]
    data.write_skipped(source, sorted(set(range(source.num_examples)) - set(seen)),
                       f"{out}/skipped.tsv")
    data.write_index_map(source, f"{out}/examples.tsv")
    return {"used": {source.describe(i): source.decode(tf.constant(i, tf.int64), None)
                     .shape.as_list() for i in seen},
            "skipped": {row[1]: row[2] for row in _rows(f"{out}/skipped.tsv")},
            "examples": _rows(f"{out}/examples.tsv")}


def _child_read_while_files_change(root: str, out: str, changes: dict) -> dict:
    """Opens folder:root, then changes files (path: "delete", "folder", "dangling link", "fifo"
    or a device to link to), then
    reads as a run would: a feature pass, and a DeepCluster epoch (drawn with labels from before
    the change) and a DeepCluster-v2 epoch, each of a batch of 4 per 4 images."""
    import tensorflow as tf
    from dc_tf import data
    from dc_tf.data import pipelines
    source = data.open_source(f"folder:{root}")
    for path, change in changes.items():
        os.remove(os.path.join(root, path))
        if change == "folder":
            os.mkdir(os.path.join(root, path))
        elif change == "dangling link":
            os.symlink(os.path.join(root, "nothing"), os.path.join(root, path))
        elif change == "fifo":
            os.mkfifo(os.path.join(root, path))
        elif change.startswith("/dev/"):
            os.symlink(change, os.path.join(root, path))
    n, epoch = source.num_examples, tf.Variable(0, dtype=tf.int64)
    seen = [int(i) for _, idx, _ in pipelines.feature_dataset(source, 36, 32, 8)
            .as_numpy_iterator() for i in idx]
    data.write_skipped(source, sorted(set(range(n)) - set(seen)), f"{out}/skipped.tsv")
    labels = tf.Variable(np.arange(n, dtype=np.int32) % 3)
    v1 = pipelines.training_dataset(source, labels, tf.Variable(tf.ones(3)), epoch, 16,
                                    (0.3, 1.0), (0.75, 1.33), 4, n // 4, seed=0)
    v2 = pipelines.multicrop_dataset(source, epoch, 16, 2, (0.3, 1.0), 0, 8, (0.05, 0.2),
                                     (0.75, 1.33), 4, n // 4, seed=0)
    return {"skipped": {row[1]: row[2] for row in _rows(f"{out}/skipped.tsv")},
            "batches": [sum(1 for _ in v1), sum(1 for _ in v2)]}


def _child_epochs_after_images_vanish(cases: list) -> list:
    """For each (root, keep, method): opens folder:root, deletes all its files but `keep`, then
    reads one training epoch of the method, with labels from before; the error it ends with (or
    the batches it gave)."""
    import tensorflow as tf
    from dc_tf import data
    from dc_tf.data import pipelines
    messages = []
    for root, keep, method in cases:
        source = data.open_source(f"folder:{root}")
        for path in source.paths[keep:]:
            os.remove(os.path.join(root, path))
        n, epoch = source.num_examples, tf.Variable(0, dtype=tf.int64)
        if method == "deepcluster":
            ds = pipelines.training_dataset(
                source, tf.Variable(np.arange(n, dtype=np.int32) % 3), tf.Variable(tf.ones(3)),
                epoch, 16, (0.3, 1.0), (0.75, 1.33), 4, n // 4, seed=0)
        else:
            ds = pipelines.multicrop_dataset(source, epoch, 16, 2, (0.3, 1.0), 0, 8, (0.05, 0.2),
                                             (0.75, 1.33), 4, n // 4, seed=0)
        try:
            messages.append(f"{sum(1 for _ in ds)} batches")
        except tf.errors.OpError as e:
            messages.append(e.message)
    return messages


def _child_read_strips(root: str) -> dict:
    """Decoded sizes of every image of folder:root, and what the feature pass (at ImageNet's 256
    and 224), a DeepCluster epoch of 2 batches of 2 and a DeepCluster-v2 epoch (2 + 2 crops, a
    batch of 2 per 2 images) make of them."""
    import tensorflow as tf
    from dc_tf import data
    from dc_tf.data import pipelines
    source = data.open_source(f"folder:{root}")
    n, epoch = source.num_examples, tf.Variable(0, dtype=tf.int64)
    features = list(pipelines.feature_dataset(source, 256, 224, 8).as_numpy_iterator())
    v1 = pipelines.training_dataset(source, tf.Variable(np.zeros(n, np.int32)),
                                    tf.Variable(tf.ones(1)), epoch, 224, (0.08, 1.0),
                                    (0.75, 1.33), 2, 2, seed=0)
    v2 = pipelines.multicrop_dataset(source, epoch, 224, 2, (0.14, 1.0), 2, 96, (0.05, 0.14),
                                     (0.75, 1.33), 2, n // 2, seed=0)
    return {"shapes": {source.describe(i): source.decode(tf.constant(i, tf.int64), None)
                       .shape.as_list() for i in range(n)},
            "used": sorted(source.describe(int(i)) for _, idx, _ in features for i in idx),
            "finite": all(bool(np.isfinite(x).all()) for x, _, _ in features),
            "batches": [sum(1 for _ in v1), sum(1 for _ in v2)]}


# ---------------------------------------------------------------- files

def _special_files(folder) -> dict:
    """Two FIFOs, links to two character devices, a socket and a sparse file above
    MAX_FILE_BYTES, named as images: {name: words of the reason it is skipped for}."""
    os.makedirs(folder, exist_ok=True)
    os.mkfifo(os.path.join(folder, "pipe.jpg"))
    os.mkfifo(os.path.join(folder, "pipe2.png"))
    os.symlink("/dev/zero", os.path.join(folder, "zero.png"))
    os.symlink("/dev/urandom", os.path.join(folder, "random.gif"))
    os.mknod(os.path.join(folder, "socket.jpg"), stat.S_IFSOCK | 0o600)
    with open(os.path.join(folder, "sparse.jpg"), "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    return {"pipe.jpg": "FIFO", "pipe2.png": "FIFO", "zero.png": "character device",
            "random.gif": "character device", "socket.jpg": "socket",
            "sparse.jpg": f"MAX_FILE_BYTES = {MAX_FILE_BYTES}"}


def _bytes_name(folder, name: bytes, image: bool = True) -> str:
    """Writes an image (or text) under a file name of arbitrary bytes; returns the name as the
    index map must show it (Python's backslashreplace, control characters escaped)."""
    path = os.path.join(os.fsencode(folder), name)
    if image:
        os.rename(os.fsencode(write_image(os.path.join(folder, "tmp.png"), (30, 20), seed=7)),
                  path)
    else:
        with open(path, "w") as f:
            f.write("not an image")
    text = name.decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 else c for c in text)


def _encoded(fmt: str, mode: str = "RGB", size=(40, 30), **options) -> bytearray:
    """Random pixels (and alpha, in RGBA) encoded by PIL."""
    array = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array, "RGBA").convert(mode).save(buffer, fmt, **options)
    return bytearray(buffer.getvalue())


def _oversized_headers(folder) -> dict:
    """A small real file of every format tf.io.decode_image opens whose header announces more
    than MAX_IMAGE_PIXELS (JPEG XL: its signature only, refused whatever follows), named .jpg or
    .png as a folder lists them: {name: words of the reason it is skipped for}."""
    files, big = {}, f"MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}"

    def u16(value, order="little"):
        return value.to_bytes(2, order)
    jpeg = _encoded("JPEG")
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = u16(50000, "big") + u16(60000, "big")
    files["start_of_frame.jpg"] = jpeg
    png = _encoded("PNG")
    png[16:24] = (20000).to_bytes(4, "big") * 2
    files["ihdr.png"] = png
    bmp = _encoded("BMP")
    bmp[18:26] = (20000).to_bytes(4, "little") * 2
    files["info_header.jpg"] = bmp
    # The logical screen stays 40 x 30: the decoder sizes its output by the image descriptors.
    gif = _encoded("GIF")
    image = 13 + 3 * 2 ** ((gif[10] & 7) + 1)  # the first image's descriptor, after the palette
    assert gif[image] == 0x2C
    gif[image + 5:image + 9] = u16(12000) * 2
    files["first_image.gif"] = gif
    lossy = _encoded("WEBP")
    lossy[26:30] = u16(16383) * 2
    files["vp8.jpg"] = lossy
    lossless = _encoded("WEBP", lossless=True)
    lossless[21:25] = (16383 | 16383 << 14).to_bytes(4, "little")
    files["vp8l.png"] = lossless
    extended = _encoded("WEBP", mode="RGBA")  # alpha: the extended format, with a canvas size
    assert extended[12:16] == b"VP8X"
    extended[24:30] = (20000 - 1).to_bytes(3, "little") * 2
    files["vp8x.jpg"] = extended
    files["codestream.png"] = b"\xff\x0a\xff\x07" + bytes(60)
    os.makedirs(folder)
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return {name: "JPEG XL" if name == "codestream.png" else big for name in files}


def _gif_with_a_larger_later_frame(path, later: tuple) -> None:
    """A 40 x 30 GIF, then a frame of size `later`, outside its logical screen (PIL clips it)."""
    encoded = []
    for size, colour in (((40, 30), (200, 0, 0)), (later, (0, 90, 0))):
        buffer = io.BytesIO()
        Image.new("RGB", size, colour).save(buffer, "GIF")
        encoded.append(buffer.getvalue())
    first, later_frame = encoded
    blocks = 13 + 3 * 2 ** ((later_frame[10] & 7) + 1)  # after its header and palette
    with open(path, "wb") as f:
        f.write(first[:-1] + later_frame[blocks:])  # the first one's trailer replaced


# ---------------------------------------------------------------- tests

def test_fifos_devices_sockets_and_huge_files_are_refused_when_listed_never_opened(tmp_path):
    good = _good_images(tmp_path / "images", 6)
    special = _special_files(tmp_path / "images" / "c1")
    found = _in_child(_child_read_folder, str(tmp_path / "images"), str(tmp_path))
    assert sorted(found["used"]) == sorted(good)
    assert set(found["skipped"]) == {f"c1/{name}" for name in special}
    for name, words in special.items():
        assert words in found["skipped"][f"c1/{name}"], found["skipped"]


def test_files_that_vanish_or_become_unreadable_mid_run_are_skipped_and_listed(tmp_path):
    # Replaced after the folder was listed: a read of a FIFO would wait for a writer forever,
    # one of /dev/zero or /dev/urandom would never end.
    good = _good_images(tmp_path / "images", 24)
    why = {"delete": "No such file", "dangling link": "No such file", "folder": "a folder",
           "fifo": "a FIFO", "/dev/zero": "a character device",
           "/dev/urandom": "a character device"}
    changes = {good[0]: "delete", good[7]: "delete", good[4]: "folder",
               good[11]: "dangling link", good[2]: "fifo", good[13]: "fifo",
               good[5]: "/dev/zero", good[9]: "/dev/urandom"}
    found = _in_child(_child_read_while_files_change, str(tmp_path / "images"), str(tmp_path),
                      changes)
    assert set(found["skipped"]) == set(changes)
    for path, change in changes.items():
        assert why[change] in found["skipped"][path], found["skipped"]
    # Both training streams fill their 6 batches of 4 from the 16 images left.
    assert found["batches"] == [6, 6]


def test_an_epoch_whose_images_vanish_stops_with_a_clear_message(tmp_path):
    # None left: an unbounded stream draws and fails forever; one left: it fills the epoch.
    cases = [(str(tmp_path / "a"), 0, "deepcluster"), (str(tmp_path / "b"), 1, "deepcluster"),
             (str(tmp_path / "c"), 3, "deepcluster_v2")]
    for root, _, _ in cases:
        _good_images(root, 20)
    messages = _in_child(_child_epochs_after_images_vanish, cases, timeout=60)
    for (root, _, _), message in zip(cases, messages):
        assert f"of the 40 images this epoch read from folder:{root} could be decoded" in \
            message, message
        assert "vanished" in message and "re-run the same command" in message


def test_sizes_are_read_from_every_format_the_decoder_opens(tmp_path):
    expected = _oversized_headers(tmp_path / "images")
    good = _good_images(tmp_path / "images", 3)
    # The decoder sizes a GIF by its largest frame, reading them all: only the first is used.
    _gif_with_a_larger_later_frame(tmp_path / "images" / "later_frame.gif", (2400, 1600))
    _gif_with_a_larger_later_frame(tmp_path / "images" / "same_frames.gif", (40, 30))
    found = _in_child(_child_read_folder, str(tmp_path / "images"), str(tmp_path))
    assert set(found["skipped"]) == set(expected)
    for name, words in expected.items():
        assert words in found["skipped"][name], (name, found["skipped"][name])
    assert found["used"] == {**{p: [36, 40 + i, 3] for i, p in enumerate(good)},
                             "later_frame.gif": [30, 40, 3], "same_frames.gif": [30, 40, 3]}


def test_extreme_aspect_ratios_are_cut_before_any_resize(tmp_path):
    os.makedirs(tmp_path / "images")
    # The widest PNG libpng reads (1,000,000 pixels) and a column of 60,000 x 3.
    Image.new("RGB", (1_000_000, 1), (10, 200, 30)).save(tmp_path / "images" / "row.png")
    Image.new("RGB", (3, 60_000), (200, 10, 30)).save(tmp_path / "images" / "column.png")
    write_image(str(tmp_path / "images" / "photo.jpg"), (300, 200))
    found = _in_child(_child_read_strips, str(tmp_path / "images"))
    # At most 10:1, around the centre; the feature pass and both training streams use them all.
    assert found["shapes"] == {"row.png": [1, 10, 3], "column.png": [30, 3, 3],
                               "photo.jpg": [200, 300, 3]}
    assert found["used"] == ["column.png", "photo.jpg", "row.png"] and found["finite"]
    assert found["batches"] == [2, 1]


def test_file_names_that_are_not_utf8_are_read_and_listed(tmp_path):
    good = _good_images(tmp_path / "images", 3)
    folder = tmp_path / "images" / "c0"
    odd = [os.path.join("c0", _bytes_name(folder, b"caf\xe9.jpg")),
           os.path.join("c0", _bytes_name(folder, b"\xff\xfe tab\there.png"))]
    broken = os.path.join("c0", _bytes_name(folder, b"\xe9chec\n.jpg", image=False))
    found = _in_child(_child_read_folder, str(tmp_path / "images"), str(tmp_path))
    assert sorted(found["used"]) == sorted(good + odd)
    assert found["skipped"] == {broken: found["skipped"][broken]}
    assert "Unknown image file format" in found["skipped"][broken]
    assert sorted(row[1] for row in found["examples"]) == sorted(good + odd + [broken])
    assert all(len(row) == 3 for row in found["examples"])


def test_a_run_on_a_folder_with_special_files_strips_and_odd_names_completes(tmp_path):
    root = tmp_path / "images"
    good = _good_images(root, 24)
    special = _special_files(root / "c2")
    odd = [os.path.join("c0", _bytes_name(root / "c0", b"caf\xe9.jpg")),
           os.path.join("c1", _bytes_name(root / "c1", b"new\nline\xff.png"))]
    Image.new("RGB", (3, 600), (0, 0, 200)).save(root / "c0" / "column.png")
    Image.new("RGB", (2000, 2), (0, 200, 0)).save(root / "c1" / "row.png")
    strips = [os.path.join("c0", "column.png"), os.path.join("c1", "row.png")]
    model_dir = tmp_path / "run"
    result = _train(f"--dataset=folder:{root}", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = {row[1]: row[2] for row in _rows(model_dir / "skipped.tsv")}
    assert set(skipped) == {os.path.join("c2", name) for name in special}
    for name, words in special.items():
        assert words in skipped[os.path.join("c2", name)]
    metrics = json.loads((model_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["skipped_images"] == len(special)
    index = {row[1]: int(row[0]) for row in _rows(model_dir / "examples.tsv")}
    assert set(index) == set(good + odd + strips) | set(skipped)
    labels = np.load(model_dir / "assignments" / "final.npy")
    assert (labels[[index[p] for p in good + odd + strips]] >= 0).all()
    # The folders of links of `dc_tf.clusters` reach every used file, odd names included.
    links = tmp_path / "links"
    made = subprocess.run([sys.executable, "-m", "dc_tf.clusters", f"--model_dir={model_dir}",
                           f"--export_to={links}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert made.returncode == 0, made.stderr[-3000:]
    linked = [os.path.join(d, f) for d, _, files in os.walk(os.fsencode(links)) for f in files]
    assert len(linked) == len(good + odd + strips)
    assert all(os.path.isfile(os.readlink(link)) for link in linked)
    targets = {os.path.relpath(os.readlink(link), os.fsencode(root)) for link in linked}
    assert {os.fsencode(from_printable(p)) for p in odd} <= targets, targets


def test_a_run_whose_images_vanish_after_the_feature_pass_stops_with_a_message(tmp_path):
    root = tmp_path / "images"
    _good_images(root, 24)
    # The run itself, with its images deleted when epoch 0's clustering is saved, before training.
    driver = ("import os, sys; from dc_tf import failpoints, train; reach = failpoints.reach\n"
              "def vanish(name):\n"
              "    if name == 'assignment.saved':\n"
              f"        for d, _, files in os.walk({str(root)!r}):\n"
              "            for f in files[1:]: os.remove(os.path.join(d, f))\n"
              "    reach(name)\n"
              "failpoints.reach = vanish; sys.argv[0] = 'dc_tf.train'; train.entry_point()")
    result = _train(f"--dataset=folder:{root}", f"--model_dir={tmp_path / 'run'}",
                    driver=driver)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: too few readable images: fewer than ") and (
        f"of the 48 images this epoch read from folder:{root} could be decoded" in last), last


def test_an_image_that_vanishes_after_the_last_epoch_is_listed_by_the_final_clustering(tmp_path):
    root = tmp_path / "images"
    good = _good_images(root, 24)
    gone = good[5]
    # Deleted once the last (only) epoch's checkpoint is saved, before the final clustering.
    driver = ("import os, sys; from dc_tf import failpoints, train; reach = failpoints.reach\n"
              "def vanish(name):\n"
              "    if name == 'checkpoint.saved':\n"
              f"        os.remove({str(root / gone)!r})\n"
              "    reach(name)\n"
              "failpoints.reach = vanish; sys.argv[0] = 'dc_tf.train'; train.entry_point()")
    model_dir = tmp_path / "run"
    result = _train(f"--dataset=folder:{root}", f"--model_dir={model_dir}", driver=driver)
    assert result.returncode == 0, result.stderr[-3000:]
    index = {row[1]: int(row[0]) for row in _rows(model_dir / "examples.tsv")}
    assert np.load(model_dir / "assignments" / "final.npy")[index[gone]] == -1
    skipped = _rows(model_dir / "skipped.tsv")
    assert [row[1] for row in skipped] == [gone] and "No such file" in skipped[0][2], skipped
