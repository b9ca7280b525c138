"""Runs a pipeline: components in order, each with a metadata record, cached when unchanged.

The shape is TFX's (components with typed input and output artifacts, one execution record per
component run, caching on inputs and config) without its orchestrator or ML Metadata store: the
record is a JSON file, ROOT/<component>/metadata.json, and the graph is the order of definition.

A component is skipped when its record says "succeeded", its cache key (component, resolved
config, input fingerprints, code version) is the recorded one and its outputs still have the
recorded fingerprints. A failure is recorded (error and traceback tail) and blocks only the
components that consume its outputs; re-running the pipeline retries it, and training resumes
from its model_dir checkpoints.
"""

import abc
import dataclasses
import datetime
import hashlib
import json
import os
import time
import traceback

from absl import logging

from dc_core.errors import ConfigError
from pipelines import artifacts

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Channel:
    """An output of a component, named by the component and the output key."""
    component: str
    key: str


class Component(abc.ABC):
    """A pipeline step: typed outputs under ROOT/<name>/, produced by a library function.

    Subclasses set OUTPUTS (key -> (artifact class, path relative to the component folder)) and
    CODE (the packages whose sources the result depends on: a change there re-runs it), and
    implement `resolve` and `execute`. `inputs` maps a key to a Channel or to {label: Channel}.
    """
    OUTPUTS: dict = {}
    CODE: tuple = ()

    def __init__(self, name: str, inputs: dict):
        self.name, self.inputs = name, inputs

    def output(self, key: str) -> Channel:
        if key not in self.OUTPUTS:
            raise ConfigError(f"{self.name} has no output {key!r}; it has {sorted(self.OUTPUTS)}")
        return Channel(self.name, key)

    def datasets(self) -> dict:
        """key -> DatasetRef read by this component; checked before the pipeline starts."""
        return {}

    @abc.abstractmethod
    def resolve(self, out_dir: str, inputs: dict) -> dict:
        """The complete configuration (JSON-able) that `execute` runs and the cache key hashes."""

    @abc.abstractmethod
    def execute(self, config: dict, inputs: dict, outputs: dict) -> None:
        """Produces the outputs from the inputs as `config` says."""


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Components in an order where each consumes only outputs of earlier ones."""
    name: str
    components: tuple

    def __post_init__(self):
        seen = {}
        for component in self.components:
            if component.name in seen:
                raise ConfigError(f"pipeline {self.name}: two components named {component.name}")
            for channel in _channels(component.inputs):
                producer = seen.get(channel.component)
                if producer is None or channel.key not in producer.OUTPUTS:
                    raise ConfigError(f"pipeline {self.name}: {component.name} reads "
                                      f"{channel.component}.{channel.key}, which no earlier "
                                      "component produces")
            seen[component.name] = component

    def component(self, name: str) -> Component:
        for component in self.components:
            if component.name == name:
                return component
        raise ConfigError(f"pipeline {self.name} has no component {name!r}; its components are "
                          f"{', '.join(c.name for c in self.components)}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one component in one invocation: ran, cached, failed or blocked."""
    component: str
    state: str
    detail: str = ""


def _channels(inputs: dict) -> list:
    return [c for value in inputs.values()
            for c in (value.values() if isinstance(value, dict) else [value])]


def _map(fn, value):
    """fn applied to an input value: one item, or each item of a {label: item} dict."""
    return {label: fn(v) for label, v in value.items()} if isinstance(value, dict) else fn(value)


def code_version(packages: tuple) -> dict:
    """sha256 of the .py sources of `packages` (folders of the project root)."""
    digest = hashlib.sha256()
    for package in packages:
        for folder, dirs, files in sorted(os.walk(os.path.join(PROJECT_ROOT, package))):
            dirs.sort()
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                digest.update(os.path.relpath(path, PROJECT_ROOT).encode() + b"\0")
                with open(path, "rb") as f:
                    digest.update(f.read())
    return {"sources": list(packages), "sha256": digest.hexdigest()}


def metadata_path(root: str, name: str) -> str:
    return os.path.join(root, name, "metadata.json")


def read_metadata(root: str, name: str):
    """The component's last record, or None when it never ran."""
    try:
        with open(metadata_path(root, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_metadata(root: str, name: str, record: dict) -> None:
    path = metadata_path(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)  # a reader never sees half a record


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _recorded_outputs(root: str, name: str, consumer: str) -> dict:
    """Outputs of a component that did not run in this invocation, from its metadata.json."""
    record = read_metadata(root, name)
    status = record["status"] if record else "never run"
    if status != "succeeded":
        raise ConfigError(f"{consumer} needs the outputs of {name}, which has no successful run "
                          f"in {root} ({status}); run the pipeline without --only first")
    outputs = {key: artifacts.from_record(r) for key, r in record["outputs"].items()}
    missing = [a.path for a in outputs.values() if not a.exists()]
    if missing:
        raise ConfigError(f"{consumer} needs {', '.join(missing)} (from {name}), which no longer "
                          f"exist; re-run with --force={name}")
    return outputs


def _cached(record, key: str, outputs: dict) -> bool:
    if not record or record.get("status") != "succeeded" or record.get("cache_key") != key:
        return False
    return all(a.exists() and record["outputs"].get(k, {}).get("fingerprint") == a.fingerprint()
               for k, a in outputs.items())


def _execute(component: Component, inputs: dict, root: str, pipeline: str,
             force: bool) -> Outcome:
    out_dir = os.path.join(root, component.name)
    outputs = {key: cls(os.path.join(out_dir, rel))
               for key, (cls, rel) in component.OUTPUTS.items()}
    record = {"component": component.name, "type": type(component).__name__,
              "pipeline": pipeline, "status": "running", "start_time": _now(), "end_time": None,
              "code_version": code_version(component.CODE),
              "inputs": {k: _map(lambda a: a.record(), v) for k, v in inputs.items()},
              "config": None, "cache_key": None, "outputs": {}, "error": None,
              "traceback": None}
    start = time.time()
    try:
        record["config"] = component.resolve(out_dir, inputs)
        # Records are dicts too: the inputs' own structure says which are {label: record}.
        fingerprints = {k: ({label: r["fingerprint"] for label, r in record["inputs"][k].items()}
                            if isinstance(v, dict) else record["inputs"][k]["fingerprint"])
                        for k, v in inputs.items()}
        record["cache_key"] = hashlib.sha256(json.dumps(
            [component.name, record["type"], record["config"], record["code_version"],
             fingerprints], sort_keys=True).encode()).hexdigest()
        if not force and _cached(read_metadata(root, component.name), record["cache_key"],
                                 outputs):
            logging.info("%s: cached (%s)", component.name, metadata_path(root, component.name))
            return Outcome(component.name, "cached")
        logging.info("%s: running, outputs in %s", component.name, out_dir)
        _write_metadata(root, component.name, record)
        component.execute(record["config"], inputs, outputs)
        missing = [f"{k} ({a.path})" for k, a in outputs.items() if not a.exists()]
        if missing:
            raise RuntimeError(f"{component.name} finished without writing {', '.join(missing)}")
        record.update(status="succeeded",
                      outputs={key: a.record() for key, a in outputs.items()})
        return Outcome(component.name, "ran")
    except BaseException as e:  # KeyboardInterrupt too: the record must not stay "running"
        record.update(status="failed", error=f"{type(e).__name__}: {e}",
                      traceback="".join(traceback.format_exc().splitlines(True)[-30:]))
        logging.error("%s failed: %s", component.name, record["error"])
        if not isinstance(e, Exception):
            raise
        return Outcome(component.name, "failed", record["error"])
    finally:
        if record["status"] != "running":
            record.update(end_time=_now(), duration_s=round(time.time() - start, 3))
            _write_metadata(root, component.name, record)


def run_pipeline(pipeline: Pipeline, root: str, only: str = "", force=()) -> list:
    """Runs the pipeline (or only one component) under `root`; returns one Outcome per component.

    Every dataset the selected components read is opened first, so missing data fails before any
    work (dc_tf.data.DatasetNotFoundError). Component failures do not raise: they are recorded
    and returned as Outcomes with state "failed", and their consumers as "blocked".
    """
    root = os.path.abspath(root)
    for name in (only, *force):
        if name:
            pipeline.component(name)
    selected = [pipeline.component(only)] if only else list(pipeline.components)
    checked = set()
    for component in selected:
        for ref in component.datasets().values():
            if ref not in checked:
                ref.check()
                checked.add(ref)

    produced, outcomes = {}, []
    for component in selected:
        upstream = {c.component for c in _channels(component.inputs)}
        unavailable = sorted(n for n in upstream if n not in produced and not only)
        if unavailable:
            outcomes.append(Outcome(component.name, "blocked",
                                    f"needs {', '.join(unavailable)}, which did not succeed"))
            logging.warning("%s: not run, %s", component.name, outcomes[-1].detail)
            continue
        for name in sorted(upstream - produced.keys()):
            produced[name] = _recorded_outputs(root, name, component.name)
        inputs = {key: _map(lambda c: produced[c.component][c.key], value)
                  for key, value in component.inputs.items()}
        inputs.update(component.datasets())
        outcome = _execute(component, inputs, root, pipeline.name, component.name in force)
        outcomes.append(outcome)
        if outcome.state in ("ran", "cached"):
            produced[component.name] = {key: artifacts.from_record(r) for key, r in read_metadata(
                root, component.name)["outputs"].items()}
    return outcomes
