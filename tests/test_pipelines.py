"""pipelines end to end: the smoke pipeline (flags/smoke.cfg) in a temporary root, its metadata
records, caching, --force and --only, a recorded failure, the report, and the command line
failing fast on missing ImageNet data."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from absl.testing import flagsaver

from conftest import ROOT
from dc_tf.config import ConfigError
from eval import linear_probe, metrics
from pipelines import definitions, engine, report
from pipelines.components import Baseline, LinearProbe, Report

COMPONENTS = ["Random", "DeepCluster", "Supervised", "LinearProbe", "Report"]


def _run(pipeline, root, **kwargs):
    with flagsaver.flagsaver():  # the components parse training flags into the global FLAGS
        return {o.component: o for o in engine.run_pipeline(pipeline, str(root), **kwargs)}


def _mtimes(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke_pipeline")
    return root, _run(definitions.smoke(), root)


def test_every_component_runs_and_records_its_execution(smoke):
    root, outcomes = smoke
    assert {n: o.state for n, o in outcomes.items()} == {n: "ran" for n in COMPONENTS}
    records = {n: engine.read_metadata(str(root), n) for n in COMPONENTS}
    for name, record in records.items():
        assert record["status"] == "succeeded" and record["error"] is None, name
        assert record["component"] == name and record["pipeline"] == "smoke"
        assert record["start_time"] < record["end_time"] and record["duration_s"] > 0
        assert re.fullmatch(r"[0-9a-f]{64}", record["cache_key"])
        assert re.fullmatch(r"[0-9a-f]{64}", record["code_version"]["sha256"])
        for output in record["outputs"].values():
            assert output["path"].startswith(os.path.join(str(root), name)), output
            assert os.path.exists(output["path"])
    deepcluster = records["DeepCluster"]
    assert deepcluster["config"]["max_examples"] == 512
    assert deepcluster["config"]["model_dir"] == os.path.join(str(root), "DeepCluster",
                                                              "model_dir")
    assert deepcluster["inputs"]["dataset"]["dataset"] == "fashion_mnist"
    assert records["Random"]["config"]["epochs"] == 0
    assert records["Supervised"]["config"]["supervised"] is True
    # The probe's inputs are the pretraining exports, with the fingerprints they were made with.
    probe = records["LinearProbe"]
    assert probe["config"]["names"] == ["Random", "DeepCluster", "Supervised"]
    for name, export in probe["inputs"]["models"].items():
        assert export == records[name]["outputs"]["export"], name
    assert probe["inputs"]["test_dataset"]["dataset"] == "fashion_mnist:test"
    assert records["Report"]["inputs"]["probes"]["Fashion-MNIST"] == probe["outputs"]["metrics"]


def test_report_has_the_tables_plots_and_blessing(smoke):
    root, _ = smoke
    folder = root / "Report"
    text = (folder / "report.md").read_text()
    for name in ("Random", "DeepCluster", "Supervised"):
        assert re.search(rf"^\| {name} \| .*\|$", text, re.M), name  # probe and training rows
    assert "| model | conv1 | conv2 | conv3 | kNN | NMI | ARI | ACC |" in text
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert {"nmi.png", "loss.png", "cluster_sizes.png", "probe_fashion_mnist.png"} <= set(links)
    for link in links:
        assert (folder / link).stat().st_size > 1000, link
    with open(root / "LinearProbe" / "probe.json") as f:
        probe = json.load(f)
    thresholds = definitions.smoke().component("Report").thresholds
    checks = [report.check_threshold(t, {"Fashion-MNIST": probe}) for t in thresholds]
    for threshold in thresholds:
        check = report.check_threshold(threshold, {"Fashion-MNIST": probe})
        low, high = check["value_interval"]
        assert low <= check["value"] <= high
        assert (f"| {threshold.describe()} | Fashion-MNIST | {check['value']:.4f} "
                f"[{low:.4f}, {high:.4f}] |") in text
        assert re.search(rf"^\| {re.escape(threshold.describe())} \|.*\| {check['result']} \|$",
                         text, re.M)
    assert report.blessing(checks) in text
    html = (folder / "report.html").read_text()
    assert html.count("<img ") == len(links) and "<td>DeepCluster</td>" in html


def _blessing_section(root) -> str:
    text = (root / "Report" / "report.md").read_text()
    return text.split("## Blessing")[1].split("\n## ")[0]


def test_a_second_run_of_the_pipeline_gives_the_same_verdict(smoke, tmp_path):
    """Same seeds, same machine: the second run trains the same exports, the probe scores them
    alike and the intervals resample the same images, so the verdict cannot flip."""
    root, _ = smoke
    _run(definitions.smoke(), tmp_path)
    first = _blessing_section(root)
    assert "BLESSED" in first and "[" in first  # a verdict and its intervals
    assert _blessing_section(tmp_path) == first


def test_second_run_is_cached_and_touches_nothing(smoke):
    root, _ = smoke
    before = _mtimes(root)
    start = time.time()
    outcomes = _run(definitions.smoke(), root)
    assert time.time() - start < 30
    assert {n: o.state for n, o in outcomes.items()} == {n: "cached" for n in COMPONENTS}
    assert _mtimes(root) == before


def test_force_reruns_one_component_and_only_runs_one(smoke):
    root, _ = smoke
    records = {n: engine.read_metadata(str(root), n) for n in COMPONENTS}
    outcomes = _run(definitions.smoke(), root, force=("Report",))
    assert {n: o.state for n, o in outcomes.items()} == {
        **{n: "cached" for n in COMPONENTS}, "Report": "ran"}
    assert engine.read_metadata(str(root), "Report")["start_time"] > records["Report"]["end_time"]
    for name in COMPONENTS[:-1]:
        assert engine.read_metadata(str(root), name) == records[name]
    only = _run(definitions.smoke(), root, only="LinearProbe")
    assert {n: o.state for n, o in only.items()} == {"LinearProbe": "cached"}
    with pytest.raises(ConfigError, match="no component 'Probe'.*LinearProbe"):
        _run(definitions.smoke(), root, force=("Probe",))


def test_a_failure_is_recorded_and_leaves_the_rest_usable(tmp_path):
    random = Baseline("Random", "random", "flags/smoke.cfg")
    probe = LinearProbe("LinearProbe", {"Random": random.output("export")}, "fashion_mnist",
                        "fashion_mnist:test", layers=("conv9",), epochs=1, max_examples=128,
                        max_test_examples=64)
    summary = Report("Report", "failing", {"probe": probe.output("metrics")},
                     {"Random": random.output("model_dir")})
    pipeline = engine.Pipeline("failing", (random, probe, summary))
    for attempt in ("first", "second"):
        outcomes = _run(pipeline, tmp_path)
        states = {n: o.state for n, o in outcomes.items()}
        assert states == {"Random": "ran" if attempt == "first" else "cached",
                          "LinearProbe": "failed", "Report": "blocked"}, attempt
        record = engine.read_metadata(str(tmp_path), "LinearProbe")
        assert record["status"] == "failed" and record["end_time"] and not record["outputs"]
        assert "conv9" in record["error"] and "no such endpoint" in record["error"]
        assert record["error"].startswith("ConfigError") and "Traceback" in record["traceback"]
        assert record["inputs"]["models"]["Random"]["path"].endswith("Random/model_dir/export")
        assert engine.read_metadata(str(tmp_path), "Random")["status"] == "succeeded"
        assert os.path.exists(tmp_path / "Random" / "model_dir" / "export" / "saved_model.pb")
        assert engine.read_metadata(str(tmp_path), "Report") is None


def _hits(accuracy: float, n: int, seed: int) -> np.ndarray:
    """n per-image hits, exactly round(accuracy * n) of them right, in a seeded order."""
    right = round(accuracy * n)
    return np.random.default_rng(seed).permutation(np.arange(n) < right).astype(int)


def _probe_row(name, knn, conv1, n=256, seed=0):
    """A model's record as eval.linear_probe writes it, reduced to what thresholds read: the
    figures and the per-image results they come from (n test images)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    cluster = np.where(rng.random(n) < 0.5, labels, rng.integers(0, 10, n))
    knn_hits, conv1_hits = _hits(knn, n, seed + 1), _hits(conv1, n, seed + 2)
    as_text = linear_probe.per_image_record
    return {"name": name, "knn": {"top1": knn_hits.mean(), "top5": 1.0},
            "clustering": {"nmi": metrics.nmi(labels, cluster),
                           "ari": metrics.adjusted_rand_index(labels, cluster),
                           "acc": metrics.clustering_accuracy(labels, cluster)},
            "probes": {"conv1": {"top1_best": conv1_hits.mean()}},
            "per_image": as_text(labels, cluster, {"knn_top1": knn_hits,
                                                   "knn_top5": np.ones(n, int),
                                                   "top1_best:conv1": conv1_hits})}


def test_thresholds_are_data_checked_against_the_probe_json():
    probes = {"t": {"models": [_probe_row("Random", 0.50, 0.3),
                               _probe_row("DeepCluster", 0.505, 0.5, seed=1)]}}
    beats = report.Threshold("DeepCluster", "knn_top1", baseline="Random", margin=0.01)
    assert beats.describe() == "DeepCluster knn_top1 >= Random knn_top1 + 0.01"
    assert not report.check_threshold(beats, probes)["passed"]
    conv = report.Threshold("DeepCluster", "top1_best:conv1", baseline="Random", margin=0.1)
    assert report.check_threshold(conv, probes)["passed"]
    with pytest.raises(ConfigError, match="'Supervised' is not in the probe table.*Random"):
        report.check_threshold(report.Threshold("Supervised", "nmi"), probes)
    with pytest.raises(ConfigError, match="no probe on conv5"):
        report.check_threshold(report.Threshold("Random", "top1_best:conv5"), probes)
    with pytest.raises(ConfigError, match="threshold metric 'top1'"):
        report.Threshold("Random", "top1")
    del probes["t"]["models"][0]["per_image"]
    with pytest.raises(ConfigError, match="no per-image results for Random"):
        report.check_threshold(beats, probes)


def test_a_margin_inside_the_bootstrap_interval_is_not_distinguishable():
    """The smoke run's old verdict: kNN 0.7070 against a threshold of 0.7053 on 256 test images
    (one image decides) blessed; now it is reported as not distinguishable, and only a
    difference clear of the noise passes or fails."""
    beats = report.Threshold("DeepCluster", "knn_top1", baseline="Random", margin=0.01)

    def check(dc_knn, random_knn=0.6953, n=256):
        probes = {"t": {"models": [_probe_row("Random", random_knn, 0.3, n=n),
                                   _probe_row("DeepCluster", dc_knn, 0.5, n=n, seed=1)]}}
        return report.check_threshold(beats, probes)

    close = check(0.7070)
    assert close["value"] >= close["target"]  # the bare figures would pass
    assert close["result"] == report.UNDECIDED and not close["passed"]
    low, high = close["difference_interval"]
    assert low < 0.01 < high and low <= close["difference"] <= high
    assert report.blessing([close]).startswith("NOT BLESSED: 0 of 1 thresholds pass, 0 fail, 1 ")
    assert check(0.85)["result"] == report.PASS
    assert check(0.55)["result"] == report.FAIL
    # The same images give the same interval: the verdict of a probe JSON never changes.
    assert check(0.7070) == close
    # NMI is resampled too, from each image's label and cluster.
    nmi = report.check_threshold(report.Threshold("DeepCluster", "nmi", margin=0.2),
                                 {"t": {"models": [_probe_row("DeepCluster", 0.7, 0.5)]}})
    assert nmi["value_interval"][0] < nmi["value"] < nmi["value_interval"][1]
    assert nmi["result"] == report.PASS


def test_command_line_fails_fast_naming_missing_imagenet(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "--pipeline=imagenet_alexnet",
         f"--root={tmp_path / 'root'}", f"--data_dir={tmp_path / 'tfds'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "imagenet2012" in result.stderr and "tfds build imagenet2012" in result.stderr
    assert not os.path.exists(tmp_path / "root" / "Random"), "a component ran before the check"
