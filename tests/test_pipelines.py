"""pipelines end to end: the smoke pipeline (flags/smoke.cfg) in a temporary root, its metadata
records, caching, --force and --only, a recorded failure, the report, and the command line
failing fast on missing ImageNet data."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from absl.testing import flagsaver

from conftest import ROOT
from dc_tf.config import ConfigError
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
    for threshold in definitions.smoke().component("Report").thresholds:
        check = report.check_threshold(threshold, {"Fashion-MNIST": probe})
        verdict = "PASS" if check["passed"] else "FAIL"
        assert f"| {threshold.describe()} | Fashion-MNIST | {check['value']:.4f} |" in text
        assert re.search(rf"^\| {re.escape(threshold.describe())} \|.*\| {verdict} \|$", text, re.M)
    html = (folder / "report.html").read_text()
    assert html.count("<img ") == len(links) and "<td>DeepCluster</td>" in html


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


def _probe_row(name, knn, conv1):
    """A model's record as eval.linear_probe writes it, reduced to what thresholds read."""
    return {"name": name, "knn": {"top1": knn, "top5": 1.0},
            "clustering": {"nmi": 0.5, "ari": 0.1, "acc": 0.4},
            "probes": {"conv1": {"top1_best": conv1}}}


def test_thresholds_are_data_checked_against_the_probe_json():
    probes = {"t": {"models": [_probe_row("Random", 0.50, 0.3),
                               _probe_row("DeepCluster", 0.505, 0.5)]}}
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


def test_command_line_fails_fast_naming_missing_imagenet(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "--pipeline=imagenet_alexnet",
         f"--root={tmp_path / 'root'}", f"--data_dir={tmp_path / 'tfds'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "imagenet2012" in result.stderr and "tfds build imagenet2012" in result.stderr
    assert not os.path.exists(tmp_path / "root" / "Random"), "a component ran before the check"
