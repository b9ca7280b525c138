"""The pipeline's report: probe tables, training curves, cluster sizes and the blessing.

`write_report` writes report.md and report.html (the same content, rendered by dc_tf.report;
the HTML page embeds its plots, the markdown page links the PNG files written beside it) into
one folder. Blessing follows TFX's Evaluator: each `Threshold` is a rule kept as data, e.g.
Threshold("DeepCluster", "knn_top1", baseline="Random", margin=0.01) for "DeepCluster kNN top-1
>= Random + 1 point". A rule passes only when noise cannot flip it: each figure gets a 95 %
interval over the test images (a paired bootstrap of per-image hits for accuracies; random
halves for NMI, ARI and clustering accuracy, which a bootstrap inflates), a difference of two
models is resampled on the same images, and the rule passes when its whole interval clears the
target, fails when the whole interval falls short, and is "not distinguishable" otherwise, which
does not bless.
"""

import dataclasses
import datetime
import glob
import os
import re

import numpy as np

from dc_core import fileio
from dc_core.errors import ConfigError
from dc_core import pages
from dc_tf.run_dir import RunDir
from eval import metrics
from eval.linear_probe import markdown_table

# Metric name -> where it sits in a model's record of eval.linear_probe's JSON.
_MODEL_METRICS = {"knn_top1": ("knn", "top1"), "knn_top5": ("knn", "top5"),
                  "nmi": ("clustering", "nmi"), "ari": ("clustering", "ari"),
                  "acc": ("clustering", "acc")}
_LAYER_METRICS = ("top1_best", "top1_last", "top5_best", "top5_last")  # as "top1_best:conv3"
# The clustering figures, recomputed from (labels, cluster) of the resampled test images.
_CLUSTER_SCORES = {"nmi": metrics.nmi, "ari": metrics.adjusted_rand_index,
                   "acc": metrics.clustering_accuracy}
LEVEL = 0.95  # coverage of the intervals
SEED = 0  # of the resampling: the same probe JSON always gets the same verdict

PASS, FAIL, UNDECIDED = "PASS", "FAIL", "NOT DISTINGUISHABLE"


@dataclasses.dataclass(frozen=True)
class Threshold:
    """metric(model) >= metric(baseline) + margin, or metric(model) >= margin without baseline.

    Metrics are fractions as in the probe JSON (margin 0.01 = one point): knn_top1, knn_top5,
    nmi, ari, acc, or top1_best / top1_last / top5_best / top5_last followed by ":LAYER".
    `probe` names the probe table (default: the first).
    """
    model: str
    metric: str
    baseline: str = ""
    margin: float = 0.0
    probe: str = ""

    def __post_init__(self):
        kind, _, layer = self.metric.partition(":")
        if self.metric not in _MODEL_METRICS and not (kind in _LAYER_METRICS and layer):
            raise ConfigError(f"threshold metric {self.metric!r}: use one of "
                              f"{', '.join(_MODEL_METRICS)} or top1_best:LAYER (also top1_last, "
                              "top5_best, top5_last)")

    def describe(self) -> str:
        target = f"{self.baseline} {self.metric} + {self.margin:g}" if self.baseline else (
            f"{self.margin:g}")
        return f"{self.model} {self.metric} >= {target}"


def _row(probe_report: dict, model: str) -> dict:
    rows = {row["name"]: row for row in probe_report["models"]}
    if model not in rows:
        raise ConfigError(f"threshold model {model!r} is not in the probe table; its models are "
                          f"{', '.join(rows)}")
    return rows[model]


def metric_value(probe_report: dict, model: str, metric: str) -> float:
    """The metric of one model in eval.linear_probe's JSON; ConfigError naming what exists."""
    row = _row(probe_report, model)
    if metric in _MODEL_METRICS:
        group, key = _MODEL_METRICS[metric]
        return float(row[group][key])
    kind, _, layer = metric.partition(":")
    if layer not in row["probes"]:
        raise ConfigError(f"threshold metric {metric!r}: {model} has no probe on {layer}; its "
                          f"probed layers are {', '.join(row['probes'])}")
    return float(row["probes"][layer][kind])


def per_image(probe_report: dict, model: str, metric: str) -> tuple:
    """(arrays, score): per-test-image arrays of one model's figure and the function of them
    that gives the figure, score(*arrays) == metric_value(...), for resampling."""
    metric_value(probe_report, model, metric)  # a missing model or layer is named first
    record = _row(probe_report, model).get("per_image")
    if record is None:
        raise ConfigError(f"the probe table has no per-image results for {model}; evaluate it "
                          "again with the current eval.linear_probe")

    def array(name):
        return np.array(record[name].split(), np.int64)
    if metric in _CLUSTER_SCORES:
        return (array("labels"), array("cluster")), _CLUSTER_SCORES[metric]
    return (array(metric),), np.mean


def check_threshold(threshold: Threshold, probe_reports: dict) -> dict:
    """One threshold against {title: probe JSON}, with bootstrap intervals over the test images.

    Returns:
      {"rule", "probe", "value", "value_interval", "target", "result" (PASS, FAIL or NOT
       DISTINGUISHABLE), "passed"}; with a baseline also "baseline_value", "baseline_interval",
      "difference" and "difference_interval" (model minus baseline, paired). The rule's
      interval is the difference's with a baseline, the value's without; it passes when the
      interval's low end reaches the margin and fails when its high end stays below it.
    """
    title = threshold.probe or next(iter(probe_reports))
    if title not in probe_reports:
        raise ConfigError(f"threshold probe {title!r}: the probe tables are "
                          f"{', '.join(probe_reports)}")
    probe_report = probe_reports[title]

    resample = (metrics.half_sample_interval if threshold.metric in _CLUSTER_SCORES
                else metrics.bootstrap_interval)

    def interval(score, arrays):
        return resample(score, arrays, SEED, level=LEVEL)

    arrays, score = per_image(probe_report, threshold.model, threshold.metric)
    value = metric_value(probe_report, threshold.model, threshold.metric)
    out = {"rule": threshold.describe(), "probe": title, "value": value,
           "value_interval": interval(score, arrays)}
    tested = out["value_interval"]
    if threshold.baseline:
        base_arrays, base_score = per_image(probe_report, threshold.baseline, threshold.metric)
        base = metric_value(probe_report, threshold.baseline, threshold.metric)
        n = len(arrays)
        if len(base_arrays[0]) != len(arrays[0]):
            raise ConfigError(f"threshold {threshold.describe()}: {threshold.model} and "
                              f"{threshold.baseline} were tested on different numbers of images")

        def difference(*both):
            return score(*both[:n]) - base_score(*both[n:])
        out.update(baseline_value=base, baseline_interval=interval(base_score, base_arrays),
                   difference=value - base,
                   difference_interval=interval(difference, (*arrays, *base_arrays)))
        tested = out["difference_interval"]
    out["target"] = threshold.margin + (out.get("baseline_value") or 0.0)
    out["result"] = (PASS if tested[0] >= threshold.margin else
                     FAIL if tested[1] < threshold.margin else UNDECIDED)
    out["passed"] = out["result"] == PASS
    return out


def blessing(checks: list) -> str:
    """The verdict sentence of a list of `check_threshold` results."""
    counts = {r: sum(c["result"] == r for c in checks) for r in (PASS, FAIL, UNDECIDED)}
    verdict = "BLESSED" if counts[PASS] == len(checks) else "NOT BLESSED"
    return (f"{verdict}: {counts[PASS]} of {len(checks)} thresholds pass, {counts[FAIL]} fail, "
            f"{counts[UNDECIDED]} not distinguishable from their target ({100 * LEVEL:g} % "
            "intervals over the test images).")


def _with_interval(value, bounds) -> str:
    return "-" if value is None else f"{value:.4f} [{bounds[0]:.4f}, {bounds[1]:.4f}]"


# ------------------------------------------------------------------------------ training runs

def _slug(text: str) -> str:
    return re.sub(r"[^\w]+", "_", text).strip("_").lower()


# ------------------------------------------------------------------------------ the report

def write_report(out_dir: str, title: str, probe_reports: dict, runs: dict, thresholds: list,
                 evaluation_tables: dict = None) -> str:
    """Writes report.md, report.html and the plots into out_dir; returns report.md's path.

    Args:
      probe_reports: table title -> eval.linear_probe's JSON (dict).
      runs: model label -> a dc_tf.train model_dir.
      thresholds: Threshold rules.
      evaluation_tables: section title -> an Evaluation's markdown tables (caption, table).
    """
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.png")):
        os.remove(stale)  # a plot this run does not draw must not be linked from an old one
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks = [("h1", title), ("p", f"Written {stamp} by pipelines.report.")]

    checks = [check_threshold(t, probe_reports) for t in thresholds]
    blocks.append(("h2", "Blessing"))
    if checks:
        blocks += [("p", blessing(checks)),
                   ("table", ["rule", "probe", "value [95 % CI]", "baseline [95 % CI]",
                              "difference [95 % CI]", "target", "result"],
                    [[c["rule"], c["probe"], _with_interval(c["value"], c["value_interval"]),
                      _with_interval(c.get("baseline_value"), c.get("baseline_interval")),
                      _with_interval(c.get("difference"), c.get("difference_interval")),
                      f"{c['target']:.4f}", c["result"]] for c in checks])]
    else:
        blocks.append(("p", "No thresholds are set for this pipeline."))

    for probe_title, probe_report in probe_reports.items():
        blocks += [("h2", f"Linear probes: {probe_title}"), ("md", markdown_table(probe_report))]
        series = []
        for row in probe_report["models"]:
            layers = list(row["probes"])
            series.append((row["name"], layers,
                           [100 * row["probes"][layer]["top1_best"] for layer in layers]))
        blocks.append(("img", pages.plot(f"probe_{_slug(probe_title)}.png",
                                         f"Linear probe top-1 per layer ({probe_title})", "layer",
                                         "top-1 % (best epoch)", series)))

    for section, tables in (evaluation_tables or {}).items():
        blocks += [("h2", section), *(("md", table) for table in tables)]

    metrics = {label: RunDir(path).read_metrics() for label, path in runs.items()}
    keys = ["loss", "nmi_labels", "nmi_prev", "empty_clusters"]
    if metrics:
        blocks.append(("h2", "Training"))
        blocks.append(("table", ["model", "epochs", *keys],
                       [[label, str(len(rows)), *("-" if not rows or rows[-1].get(k) is None
                                                  else f"{rows[-1][k]:.4g}" for k in keys)]
                        for label, rows in metrics.items()]))
        blocks.append(("p", "Last epoch of each run's metrics; a run without epochs "
                            "(Random) has none."))
    nmi = [(f"{label} {key}", [r["epoch"] for r in rows if r.get(key) is not None],
            [r[key] for r in rows if r.get(key) is not None])
           for label, rows in metrics.items() for key in ("nmi_labels", "nmi_prev")]
    nmi = [s for s in nmi if s[1]]
    if nmi:
        blocks.append(("img", pages.plot("nmi.png", "NMI over epochs", "epoch", "NMI", nmi)))
    loss = [(label, [r["epoch"] for r in rows], [r["loss"] for r in rows])
            for label, rows in metrics.items() if rows]
    if loss:
        blocks.append(("img", pages.plot("loss.png", "Training loss", "epoch", "loss", loss)))
    sizes = []
    for label, path in runs.items():
        last = RunDir(path).last_assignment()
        if last is not None:
            counts = np.bincount(last[1][last[1] >= 0])
            counts = np.sort(counts[counts > 0])[::-1]
            sizes.append((f"{label} ({last[0]})", np.arange(1, len(counts) + 1), counts))
    if sizes:
        blocks.append(("img", pages.plot("cluster_sizes.png", "Cluster sizes, newest clustering",
                                         "cluster (largest first)", "images", sizes,
                                         log_y=True)))

    for kind, *args in blocks:  # the markdown page links the plots by file name
        if kind == "img":
            fileio.atomic_write(os.path.join(out_dir, args[0].name), args[0].png)
    fileio.atomic_write(os.path.join(out_dir, "report.html"), pages.html_page(title, blocks))
    path = os.path.join(out_dir, "report.md")
    fileio.atomic_write(path, pages.markdown_page(blocks))
    return path
