"""eval.retrieval: metrics on hand-built rankings, R-MAC regions and whitening, and the whole
program on generated miniature Oxford/Paris datasets in the revisited and classic formats, read
through a random-init export that dc_tf.train writes."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from conftest import ROOT, config_from_flagfile
from dc_tf.config import ConfigError
from eval import metrics, retrieval, rmac

# ------------------------------------------------------------------------------ metrics


def _oxford_compute_ap(ranking, positives, ignored):
    """The Oxford benchmark's compute_ap.cpp loop, transcribed: walk the ranking, skip ignored
    images, add the trapezoid between consecutive (recall, precision) points."""
    ap, old_recall, old_precision, hits, seen = 0.0, 0.0, 1.0, 0, 0
    for image in ranking:
        if image in ignored and image not in positives:
            continue
        hits += image in positives
        recall, precision = hits / len(positives), hits / (seen + 1)
        ap += (recall - old_recall) * (old_precision + precision) / 2
        old_recall, old_precision, seen = recall, precision, seen + 1
    return ap


def test_ap_positives_at_the_top_and_at_the_bottom():
    assert metrics.retrieval_average_precision([3, 1, 0, 2, 4], [3, 1]) == 1.0
    # The only positive last of 5: trapezoid (0/4 + 1/5) / 2 = 0.1.
    assert metrics.retrieval_average_precision([0, 1, 2, 3, 4], [4]) == pytest.approx(0.1)
    # Positives at ranks 0 and 4: 1/2 · (1 + 1)/2 + 1/2 · (1/4 + 2/5)/2 = 0.6625.
    assert metrics.retrieval_average_precision([7, 0, 1, 2, 9], [7, 9]) == pytest.approx(0.6625)


def test_junk_above_positives_is_skipped():
    # [junk, pos, neg, pos] scores as [pos, neg, pos]: 1/2 · 1 + 1/2 · (1/2 + 2/3)/2 = 19/24.
    ap = metrics.retrieval_average_precision([5, 1, 2, 3], [1, 3], ignored=[5])
    assert ap == pytest.approx(19 / 24)
    assert metrics.retrieval_average_precision([1, 2, 3], [1, 3]) == pytest.approx(19 / 24)
    # Without the junk list the same ranking is worse: ranks 1 and 3.
    assert metrics.retrieval_average_precision([5, 1, 2, 3], [1, 3]) == pytest.approx(
        0.5 * (0 + 0.5) / 2 + 0.5 * (1 / 3 + 2 / 4) / 2)


def test_ap_matches_the_oxford_loop_on_random_rankings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ranking = rng.permutation(30)
        positives = rng.choice(30, rng.integers(1, 8), replace=False)
        ignored = rng.choice(np.setdiff1d(np.arange(30), positives), 6, replace=False)
        assert metrics.retrieval_average_precision(ranking, positives, ignored) == \
            pytest.approx(_oxford_compute_ap(ranking, set(positives), set(ignored)))


def test_revisited_map_skips_queries_without_positives_and_scores_mp_at_k():
    ranks = np.array([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    gnd = [{"easy": [0, 2], "hard": [], "junk": [1]},
           {"easy": [4], "hard": [0], "junk": [5]}]
    scores = metrics.revisited_retrieval_map(ranks, gnd, kappas=(1, 2))
    # Hard: query 0 has no hard positive and is skipped; query 1 ranks 5 (junk) 4 (easy,
    # ignored) 3 2 1 0: its one positive lands at rank 3 after the 2 ignored above it.
    assert scores["hard"]["skipped"] == 1 and np.isnan(scores["hard"]["aps"][0])
    assert scores["hard"]["map"] == pytest.approx((0 / 3 + 1 / 4) / 2)
    # Easy: query 0 at ranks 0, 1 once junk 1 is removed (AP 1); query 1: easy 4 at rank 0
    # once junk 5 is removed (AP 1).
    assert scores["easy"]["map"] == 1.0 and scores["easy"]["mp@2"] == 1.0
    # Medium, query 1: positives 4 (rank 0) and 0 (rank 4 after junk 5): AP = 1/2 · 1 +
    # 1/2 · (1/4 + 2/5)/2; mP@1 = 1, mP@2 = 1/2 for it (1 and 1 for query 0).
    assert scores["medium"]["aps"][1] == pytest.approx(0.5 + 0.5 * (0.25 + 0.4) / 2)
    assert scores["medium"]["mp@1"] == 1.0 and scores["medium"]["mp@2"] == 0.75
    classic = metrics.classic_retrieval_map(ranks, [{"ok": [0, 2], "junk": [1]},
                                                    {"ok": [4, 0], "junk": [5]}])
    assert classic["map"] == pytest.approx(scores["medium"]["map"])


# ------------------------------------------------------------------------------ descriptors

def test_rmac_regions_of_a_4_3_map_match_the_reference_rule():
    # A 1024x768 image gives VGG16 conv5_3 a 64x48 map. w = 48; the level-1 step for 2..7
    # regions along the long side is b = 16 / (n - 1) = 16, 8, 5.3, 4, 3.2, 2.7, overlap
    # 1 - b/48 = 0.67, 0.83, ... so 2 regions (closest to 0.4) and extra = 1. Levels 1, 2, 3:
    # sides 48, 32, 24 with 1x2, 2x3, 3x4 regions: 2 + 6 + 12 = 20.
    for height, width in ((48, 64), (64, 48)):
        regions = rmac.rmac_regions(height, width, 3)
        assert len(regions) == 20
        assert sorted(set(regions[:, 2])) == [24, 32, 48]
        assert (regions[:, :2] >= 0).all()
        assert (regions[:, 0] + regions[:, 2] <= width).all()
        assert (regions[:, 1] + regions[:, 3] <= height).all()
    # Level 3 along the 64-px side: centres floor(11 + k·40/3) - 11 = 0, 13, 26, 40.
    assert sorted(set(rmac.rmac_regions(48, 64, 3)[-12:, 0])) == [0, 13, 26, 40]
    assert len(rmac.rmac_regions(32, 32, 3)) == 1 + 4 + 9  # square: l x l per level


def test_pooled_vectors_on_a_hand_built_map():
    fmap = np.zeros((4, 6, 2), np.float32)
    fmap[0, 5] = [3.0, 4.0]   # only in the right-hand square region
    fmap[3, 0] = [1.0, 0.0]
    mac = rmac.regional_vectors(fmap, "mac")
    np.testing.assert_allclose(mac, [[3 / 5, 4 / 5]], rtol=1e-6)
    gem = rmac.regional_vectors(fmap, "gem", gem_p=1.0)  # p = 1: the mean, then L2
    np.testing.assert_allclose(gem, [[4 / np.hypot(4, 4), 4 / np.hypot(4, 4)]], rtol=1e-4)
    regions = rmac.regional_vectors(fmap, "rmac", levels=1)  # 4x6: squares of 4 at x = 0, 2
    np.testing.assert_allclose(regions, [[1, 0], [3 / 5, 4 / 5]], rtol=1e-6)
    descriptor = rmac.aggregate(regions, None)
    np.testing.assert_allclose(descriptor, np.array([1.6, 0.8]) / np.hypot(1.6, 0.8), rtol=1e-6)


def test_whitening_decorrelates_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6)) + 3.0
    whitening = rmac.fit_whitening(x, 4)
    z = whitening.apply(x)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-3)
    path = rmac.save_whitening(str(tmp_path / "w.npz"), whitening, {"layer": "conv3"})
    loaded, meta = rmac.load_whitening(path, {"layer": "conv3"}, 6)
    np.testing.assert_array_equal(loaded.matrix, whitening.matrix)
    assert meta == {"layer": "conv3"}
    with pytest.raises(ConfigError, match="whitens 6-d vectors"):
        rmac.load_whitening(path, {"layer": "conv3"}, 128)
    with pytest.raises(ConfigError, match="whiten_dim=7"):
        rmac.fit_whitening(x, 7)


# ------------------------------------------------------------------------------ miniatures

SIZE = (128, 96)  # photographs at --max_size: no resampling, so both protocols crop alike


def _scene(seed: int) -> Image.Image:
    """A 256x192 'landmark': coloured rectangles and ellipses on a plain background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (256, 192), tuple(int(c) for c in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(14):
        x, y = int(rng.integers(0, 236)), int(rng.integers(0, 172))
        box = [x, y, x + int(rng.integers(15, 90)), y + int(rng.integers(15, 70))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    return image


def _photo(scene: Image.Image, rng, scale: float, brightness: float) -> Image.Image:
    """A SIZE photograph of a random part `scale` of the scene at a given brightness."""
    w, h = round(256 * scale), round(192 * scale)
    x, y = int(rng.integers(0, 256 - w + 1)), int(rng.integers(0, 192 - h + 1))
    view = scene.crop((x, y, x + w, y + h)).resize(SIZE, Image.BILINEAR)
    return ImageEnhance.Brightness(view).enhance(brightness)


def _write_revisited(root, name: str, landmarks: int, distractors: int, seed: int) -> dict:
    """DATA/NAME/jpg/*.jpg and gnd_NAME.pkl. Per landmark: a full view as query (box in its
    centre; also in the database, junk for its own query, so that the classic layout is the
    same data), 3 easy photos (large parts), 2 hard (small parts, dark or bright), 1 junk."""
    rng = np.random.default_rng(seed)
    folder = root / name / "jpg"
    folder.mkdir(parents=True)
    imlist, queries, kinds = [], [], []
    for landmark in range(landmarks):
        scene = _scene(seed * 100 + landmark)
        shots = [("query", 1.0, 1.0)] + [("easy", rng.uniform(0.75, 0.95),
                                          rng.uniform(0.85, 1.15)) for _ in range(3)]
        shots += [("hard", rng.uniform(0.45, 0.55), b) for b in (0.6, 1.4)]
        shots += [("junk", 0.3, 1.0)]
        for i, (kind, scale, brightness) in enumerate(shots):
            image = f"{name}_{landmark}_{kind}_{i}"
            _photo(scene, rng, scale, brightness).save(folder / f"{image}.jpg", quality=92)
            imlist.append(image)
            kinds.append((landmark, kind))
        queries.append(f"{name}_{landmark}_query_0")
    for i in range(distractors):
        image = f"{name}_other_{i}"
        _photo(_scene(seed * 100 + 50 + i), rng, 0.8, 1.0).save(folder / f"{image}.jpg")
        imlist.append(image)
        kinds.append((-1, "other"))
    order = rng.permutation(len(imlist))  # database order unrelated to names
    imlist, kinds = [imlist[i] for i in order], [kinds[i] for i in order]

    def where(landmark, *wanted):
        return [i for i, (m, k) in enumerate(kinds) if m == landmark and k in wanted]
    gnd = [{"bbx": [20.0, 14.6, 108.4, 80.0], "easy": where(m, "easy"),
            "hard": where(m, "hard"), "junk": where(m, "junk", "query")}
           for m in range(landmarks)]
    with open(root / name / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": queries, "gnd": gnd}, f)
    return {"imlist": imlist, "qimlist": queries, "gnd": gnd}


def _write_classic(root, name: str, source: str, cfg: dict) -> None:
    """The same data as DATA/SOURCE in the original Oxford layout: images in jpg/, the query
    image (prefixed oxc1_, as Oxford does) and box in Q_query.txt, good = easy, ok = hard,
    junk = junk and the query image, in gt/."""
    shutil.copytree(root / source / "jpg", root / name / "jpg")
    gt = root / name / "gt"
    gt.mkdir()
    for query, g in zip(cfg["qimlist"], cfg["gnd"]):
        stem = query.replace("_query_0", "")
        (gt / f"{stem}_query.txt").write_text(f"oxc1_{query} " + " ".join(map(str, g["bbx"])))
        for kind, key in (("good", "easy"), ("ok", "hard"), ("junk", "junk")):
            (gt / f"{stem}_{kind}.txt").write_text(
                "".join(cfg["imlist"][i] + "\n" for i in g[key]))


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A random-init small_vgg export (grayscale, 32 px) and the miniature datasets."""
    tmp = tmp_path_factory.mktemp("retrieval")
    from dc_tf import train
    train.run(config_from_flagfile("smoke.cfg", f"--model_dir={tmp / 'run'}", "--epochs=0"))
    data = tmp / "data"
    oxford = _write_revisited(data, "roxford5k", landmarks=4, distractors=6, seed=1)
    _write_revisited(data, "rparis6k", landmarks=3, distractors=6, seed=2)
    _write_classic(data, "oxford5k", "roxford5k", oxford)
    return {"export": str(tmp / "run" / "export"), "data": str(data), "tmp": tmp,
            "oxford": oxford}


def _config(mini, name, **overrides):
    settings = dict(model=mini["export"], dataset="roxford5k", data_dir=mini["data"],
                    output=str(mini["tmp"] / name / "retrieval.json"), max_size=SIZE[0])
    return retrieval.RetrievalConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def revisited(mini):
    """The protocol run on the revisited miniature, whitening learned on the other one."""
    return retrieval.run(_config(mini, "revisited", save_ranks=True))


def _chance_map(gnd, num_database, split, seed=0):
    """Mean mAP of random rankings of the same database."""
    rng = np.random.default_rng(seed)
    return np.mean([metrics.revisited_retrieval_map(
        np.stack([rng.permutation(num_database) for _ in gnd]), gnd)[split]["map"]
        for _ in range(20)])


def test_revisited_ranking_is_sensible(mini, revisited):
    """Even a random network ranks large views of the same scene first (easy, medium), well
    above random rankings; the files the run promises are there."""
    m, gnd = revisited["metrics"], mini["oxford"]["gnd"]
    assert revisited["num_database"] == 34 and revisited["num_queries"] == 4
    assert revisited["layer"] == "conv3" and revisited["descriptor"]["dim"] == 128
    assert m["easy"]["map"] > _chance_map(gnd, 34, "easy") + 0.4
    assert m["medium"]["map"] > _chance_map(gnd, 34, "medium") + 0.3
    assert m["easy"]["mp@1"] == 1.0
    assert revisited["whitening"]["learned_on"] == "rparis6k"
    assert revisited["whitening"]["num_vectors"] == 27 * 20  # 27 images, 20 regions each
    with open(revisited["config"]["output"]) as f:
        assert json.load(f)["metrics"]["medium"]["map"] == m["medium"]["map"]
    saved = np.load(revisited["ranks"]["ranks"])
    assert saved["ranks"].shape == (4, 34) and list(saved["queries"]) == mini["oxford"]["qimlist"]
    assert Image.open(revisited["ranks"]["montage"]).size[0] > 1000
    assert os.listdir(revisited["config"]["logdir"])


def test_classic_reader_agrees_with_the_revisited_one(mini, revisited):
    """The same images and ground truth in the classic layout (good = easy, ok = hard) give
    the revisited Medium figures, and a reused whitening reproduces the run that learned it."""
    whitening = revisited["whitening"]["file"]
    again = retrieval.run(_config(mini, "reuse", whitening=whitening))
    classic = retrieval.run(_config(mini, "classic", dataset="oxford5k", whitening=whitening))
    assert again["metrics"] == revisited["metrics"]
    assert classic["protocol"] == "classic" and classic["num_database"] == 34
    medium = revisited["metrics"]["medium"]
    assert classic["metrics"]["map"] == pytest.approx(medium["map"], abs=1e-9)
    names = [q.replace("_query_0", "") for q in mini["oxford"]["qimlist"]]
    assert classic["metrics"]["aps"] == pytest.approx(dict(zip(names, medium["aps"].values())))


def test_distractors_only_push_positives_down(mini, revisited):
    cfg = _config(mini, "distractors", whitening=revisited["whitening"]["file"],
                  distractors=os.path.join(mini["data"], "rparis6k", "jpg"))
    report = retrieval.run(cfg)
    assert report["num_distractors"] == 27 and report["num_database"] == 34 + 27
    for split in ("easy", "medium", "hard"):
        for query, ap in report["metrics"][split]["aps"].items():
            assert ap <= revisited["metrics"][split]["aps"][query] + 1e-12


def test_bad_settings_are_refused_with_the_flag(mini, revisited):
    with pytest.raises(ConfigError, match="--layer=conv9.*conv1, conv2, conv3"):
        rmac.ConvExport(mini["export"], "conv9")
    with pytest.raises(ConfigError, match="--pooling=rmac but this run has --pooling=mac"):
        retrieval.run(_config(mini, "bad", pooling="mac",
                              whitening=revisited["whitening"]["file"]))
    with pytest.raises(ConfigError, match="--dataset=holidays"):
        retrieval.run(_config(mini, "bad", dataset="holidays"))
    with pytest.raises(ConfigError, match="no .*gnd_paris6k.pkl and no \\*_query.txt"):
        retrieval.run(_config(mini, "bad", dataset="paris6k", whiten_on="none"))


def test_views_below_the_network_minimum_are_enlarged(mini):
    export = rmac.ConvExport(mini["export"])
    fmap = export.feature_map(np.zeros((5, 7, 1), np.uint8))  # small_vgg needs 8 px
    # Shorter side to S = 32: 32x45, and conv3 sits after two 2x2 pools.
    assert export.upscaled == 1 and fmap.shape == (32 // 4, 45 // 4, 128)


def test_command_line(mini):
    """Multi-scale GeM without whitening through the command line; then a bad --layer."""
    output = mini["tmp"] / "cli" / "gem.json"
    base = [sys.executable, "-m", "eval.retrieval", f"--model={mini['export']}",
            "--dataset=rparis6k", f"--data_dir={mini['data']}", "--max_size=128"]
    result = subprocess.run(base + [f"--output={output}", "--pooling=gem", "--scales=1,0.75",
                                    "--whiten_on=none"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| E mAP | M mAP | H mAP |" in result.stdout
    report = json.loads(output.read_text())
    assert report["whitening"] is None and report["descriptor"]["scales"] == [1.0, 0.75]
    assert report["metrics"]["easy"]["map"] > 0.5
    result = subprocess.run(base + [f"--output={output}", "--layer=fc7"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "error: --layer=fc7" in result.stderr


def test_pipeline_evaluation_runs_the_program_on_each_export(mini, tmp_path):
    from absl.testing import flagsaver
    from pipelines import engine
    from pipelines.artifacts import Export
    from pipelines.components import Baseline, Evaluation, Report
    random = Baseline("Random", "random", "flags/smoke.cfg")
    exports = {"Random": random.output("export"), "Random again": random.output("export")}
    search = Evaluation("Retrieval", "retrieval", exports, dataset="roxford5k",
                        data_dir=mini["data"], max_size=SIZE[0], scales=[1.0])
    report = Report("Report", "retrieval only", {}, {},
                    evaluations={"Retrieval: ROxford5k": search.output("metrics")})
    with flagsaver.flagsaver():
        outcomes = engine.run_pipeline(engine.Pipeline("t", (random, search, report)),
                                       str(tmp_path))
    assert [(o.component, o.state) for o in outcomes] == [
        ("Random", "ran"), ("Retrieval", "ran"), ("Report", "ran")], outcomes
    result = json.load(open(tmp_path / "Retrieval" / "evaluation.json"))
    assert result["program"] == "retrieval" and set(result["models"]) == set(exports)
    medium = {label: r["metrics"]["medium"]["map"] for label, r in result["models"].items()}
    assert medium["Random"] == medium["Random again"] > 0  # the same export, the same ranking
    text = open(tmp_path / "Report" / "report.md").read()
    assert "## Retrieval: ROxford5k" in text
    assert "| Random |" in text and "| Random again |" in text
    with pytest.raises(ConfigError, match="retrieval settings are"):
        Evaluation("Bad", "retrieval", exports, datasett="x").resolve(
            str(tmp_path), {"models": {"Random": Export(str(tmp_path))}})
