"""The pipeline components: each wraps one library entry point of the project.

    Pretrain     dc_tf.train.run on a flagfile + flags       -> ModelDir, Export
    Baseline     the same with --epochs=0 (Random) or --supervised (Supervised), same budget
    LinearProbe  eval.linear_probe.run over named exports    -> Metrics (probe.json)
    Evaluation   eval.retrieval / voc_classification / voc_detection on each named export
                                                              -> Metrics (evaluation.json)
    Report       pipelines.report.write_report               -> Report (report.md, .html, PNGs)
"""

import dataclasses
import json
import os

from dc_tf import config, train, train_flags
from eval import linear_probe, retrieval, voc_classification, voc_detection
from pipelines import artifacts, report
from pipelines.engine import PROJECT_ROOT, Component


class Pretrain(Component):
    """DeepCluster training: `python -m dc_tf.train --flagfile=FLAGFILE FLAGS...` as a function.

    The model_dir is ROOT/<name>/model_dir; a re-run resumes from its checkpoints, so a pipeline
    interrupted during training continues where it stopped, and --force on a finished run only
    exports again. A new configuration that cannot resume the run (anything but --epochs and
    --learning_rate) fails with dc_tf.train's message: delete ROOT/<name> to train from scratch.
    """
    OUTPUTS = {"model_dir": (artifacts.ModelDir, "model_dir"),
               "export": (artifacts.Export, "model_dir/export")}
    # A pipelines/ edit must not retrain: the result depends on dc_tf only.
    CODE = ("dc_tf",)

    def __init__(self, name: str, flagfile: str, flags: tuple = ()):
        super().__init__(name, {})
        self.flagfile, self.flags = flagfile, tuple(flags)

    def train_config(self, model_dir: str) -> config.TrainConfig:
        """Parses the flagfile and flags as the command line would, model_dir last."""
        cwd = os.getcwd()
        os.chdir(PROJECT_ROOT)  # flagfiles include each other by paths relative to the root
        try:
            return train_flags.config_from_argv(
                ["dc_tf.train", f"--flagfile={self.flagfile}", *self.flags,
                 f"--model_dir={model_dir}"])
        finally:
            os.chdir(cwd)

    def datasets(self) -> dict:
        cfg = self.train_config("-")  # the dataset does not depend on the model_dir
        return {"dataset": artifacts.DatasetRef(cfg.dataset, cfg.data_dir, cfg.max_examples)}

    def resolve(self, out_dir: str, inputs: dict) -> dict:
        cfg = self.train_config(os.path.join(out_dir, "model_dir"))
        return json.loads(cfg.to_json())

    def execute(self, cfg: dict, inputs: dict, outputs: dict) -> None:
        train.run(config.TrainConfig.from_json(json.dumps(cfg)))


class Baseline(Pretrain):
    """A paper baseline trained by the same entry point with the same flags and budget.

    kind "random": --epochs=0 exports the initialised network; "supervised": --supervised
    trains it on the labels. The kind's flag comes last, so it wins over the flagfile.
    """
    KINDS = {"random": ("--epochs=0",), "supervised": ("--supervised",)}

    def __init__(self, name: str, kind: str, flagfile: str, flags: tuple = ()):
        if kind not in self.KINDS:
            raise config.ConfigError(f"Baseline {name}: kind={kind!r}; choose one of "
                                     f"{', '.join(self.KINDS)}")
        super().__init__(name, flagfile, tuple(flags) + self.KINDS[kind])


class LinearProbe(Component):
    """eval.linear_probe on several exports at once: one table row per `models` label.

    `settings` are ProbeConfig fields (epochs, layers, max_examples, augment, ...).
    """
    OUTPUTS = {"metrics": (artifacts.Metrics, "probe.json")}
    CODE = ("dc_tf", "eval")

    def __init__(self, name: str, models: dict, dataset: str, test_dataset: str,
                 data_dir: str = "", **settings):
        super().__init__(name, {"models": dict(models)})
        self.dataset, self.test_dataset, self.data_dir = dataset, test_dataset, data_dir
        self.settings = settings

    def datasets(self) -> dict:
        return {"dataset": artifacts.DatasetRef(self.dataset, self.data_dir,
                                                self.settings.get("max_examples", 0)),
                "test_dataset": artifacts.DatasetRef(self.test_dataset, self.data_dir,
                                                     self.settings.get("max_test_examples", 0))}

    def resolve(self, out_dir: str, inputs: dict) -> dict:
        names = tuple(inputs["models"])
        try:
            cfg = linear_probe.ProbeConfig(
                models=tuple(inputs["models"][n].path for n in names), names=names,
                output=os.path.join(out_dir, "probe.json"), dataset=self.dataset,
                test_dataset=self.test_dataset, data_dir=self.data_dir, **self.settings)
        except TypeError as e:  # a setting that is no ProbeConfig field
            fields = ", ".join(f.name for f in dataclasses.fields(linear_probe.ProbeConfig))
            raise config.ConfigError(f"{self.name}: {e}; settings are ProbeConfig fields: "
                                     f"{fields}") from None
        return dataclasses.asdict(linear_probe.validate(cfg))

    def execute(self, cfg: dict, inputs: dict, outputs: dict) -> None:
        tuples = {k: tuple(cfg[k]) for k in ("models", "names", "layers")}
        linear_probe.run(linear_probe.ProbeConfig(**{**cfg, **tuples}))


class Evaluation(Component):
    """One of the evaluation programs on each export, with the same settings.

    program: "retrieval" (eval.retrieval, docs/protocols.md §6), "voc_classification"
    (docs/protocols.md §4) or "voc_detection" (docs/protocols.md §5); `settings` are fields of
    that program's config (dataset and data_dir, or voc and mode, ...). Writes evaluation.json:
    {"program", "tables" (one markdown table per model, captioned with its label), "models" (each
    model's report)}.
    """
    OUTPUTS = {"metrics": (artifacts.Metrics, "evaluation.json")}
    CODE = ("dc_tf", "eval")
    PROGRAMS = {"retrieval": (retrieval, retrieval.RetrievalConfig),
                "voc_classification": (voc_classification, voc_classification.VOCConfig),
                "voc_detection": (voc_detection, voc_detection.DetectionConfig)}

    def __init__(self, name: str, program: str, models: dict, **settings):
        if program not in self.PROGRAMS:
            raise config.ConfigError(f"{name}: program={program!r}; choose one of "
                                     f"{', '.join(self.PROGRAMS)}")
        super().__init__(name, {"models": dict(models)})
        self.program, self.settings = program, settings

    def _config(self, fields: dict):
        module, config_class = self.PROGRAMS[self.program]
        # JSON gives lists back: tuple-valued fields become tuples again.
        tuples = {f.name for f in dataclasses.fields(config_class)
                  if isinstance(f.default, tuple)}
        fields = {k: tuple(v) if k in tuples else v for k, v in fields.items()}
        try:
            return config_class(**fields)
        except TypeError as e:  # a setting that is no field of the program's config
            names = ", ".join(f.name for f in dataclasses.fields(config_class))
            raise config.ConfigError(f"{self.name}: {e}; {self.program} settings are: "
                                     f"{names}") from None

    def resolve(self, out_dir: str, inputs: dict) -> dict:
        module, config_class = self.PROGRAMS[self.program]
        named = "name" in {f.name for f in dataclasses.fields(config_class)}
        return {label: dataclasses.asdict(module.validate(self._config(
                    {"model": export.path, "output": os.path.join(out_dir, f"{label}.json"),
                     **({"name": label} if named else {}), **self.settings})))
                for label, export in inputs["models"].items()}

    def execute(self, cfg: dict, inputs: dict, outputs: dict) -> None:
        module = self.PROGRAMS[self.program][0]
        reports = {label: module.run(self._config(fields)) for label, fields in cfg.items()}
        tables = [f"{label}: {module.markdown_table(report)}"
                  for label, report in reports.items()]
        with open(outputs["metrics"].path, "w") as f:
            json.dump({"program": self.program, "tables": tables, "models": reports}, f,
                      indent=1)


class Report(Component):
    """report.md and report.html: probe tables, training curves, blessing against thresholds.

    Args:
      probes: table title -> the Metrics output of a LinearProbe.
      runs: model label -> the ModelDir output of a Pretrain or Baseline.
      evaluations: section title -> the Metrics output of an Evaluation.
      thresholds: report.Threshold rules, checked and stated pass/fail in the report.
    """
    OUTPUTS = {"report": (artifacts.Report, "report.md")}
    CODE = ("pipelines",)

    def __init__(self, name: str, title: str, probes: dict, runs: dict,
                 thresholds: tuple = (), evaluations: dict = None):
        super().__init__(name, {"probes": dict(probes), "runs": dict(runs),
                                "evaluations": dict(evaluations or {})})
        self.title, self.thresholds = title, tuple(thresholds)

    def resolve(self, out_dir: str, inputs: dict) -> dict:
        return {"title": self.title,
                "thresholds": [dataclasses.asdict(t) for t in self.thresholds]}

    def execute(self, cfg: dict, inputs: dict, outputs: dict) -> None:
        def load(metrics):
            with open(metrics.path) as f:
                return json.load(f)
        report.write_report(
            os.path.dirname(outputs["report"].path), cfg["title"],
            {title: load(m) for title, m in inputs["probes"].items()},
            {label: run.path for label, run in inputs["runs"].items()},
            [report.Threshold(**t) for t in cfg["thresholds"]],
            {title: load(m)["tables"] for title, m in inputs["evaluations"].items()})

