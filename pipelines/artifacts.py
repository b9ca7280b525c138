"""Typed artifacts that pipeline components pass to each other, and their fingerprints.

An artifact names something on disk (or, for DatasetRef, a dataset by its --dataset value) and
has a type, as in TFX's standard artifacts. Its fingerprint is what a downstream component's
cache key hashes: when the fingerprint of an input changes, the consumer runs again.

Fingerprints hash what consumers read, not everything in a folder: an Export hashes every file of
the SavedModel; a ModelDir hashes the run's record (`RunDir.record`: its configuration, metrics
and final figures, and the names and sizes of its assignments) but not its checkpoints, which only
serve resuming and would cost seconds per gigabyte to hash at ImageNet scale.
"""

import abc
import dataclasses
import hashlib
import os

from dc_core.datasets import open_source
from dc_tf.run_dir import RunDir

_CHUNK = 1 << 20


def _hash_file(digest, path: str) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)


def _hash_tree(root: str, names=None) -> str:
    """sha256 over (relative path, content) of the files below root (or of `names` in it)."""
    if names is None:
        names = sorted(os.path.relpath(os.path.join(d, f), root)
                       for d, _, files in os.walk(root) for f in files)
    digest = hashlib.sha256()
    for name in names:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            digest.update(name.encode() + b"\0")
            _hash_file(digest, path)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Artifact(abc.ABC):
    """A typed path. Subclasses say what their fingerprint covers."""
    path: str

    def exists(self) -> bool:
        return os.path.exists(self.path)

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A digest that changes when the artifact's content does."""

    def record(self) -> dict:
        """The JSON form kept in metadata.json."""
        return {"type": type(self).__name__, "path": self.path,
                "fingerprint": self.fingerprint()}


class ModelDir(Artifact):
    """A dc_tf.train model_dir: its record, not its checkpoints."""

    def fingerprint(self) -> str:
        run = RunDir(self.path)
        record = run.record()
        # The figures' files by content; the assignments, large, by name and size.
        hashed = [p for p in record if os.path.dirname(p) != run.assignment_dir]
        digest = hashlib.sha256(_hash_tree(self.path, [os.path.relpath(p, self.path)
                                                       for p in hashed]).encode())
        for path in record:
            if path not in hashed:
                digest.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
        return digest.hexdigest()


class Export(Artifact):
    """A SavedModel folder written by dc_tf.export: every file is hashed."""

    def exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "saved_model.pb"))

    def fingerprint(self) -> str:
        return _hash_tree(self.path)


class Metrics(Artifact):
    """One JSON file of evaluation results."""

    def fingerprint(self) -> str:
        return _hash_tree(os.path.dirname(self.path), [os.path.basename(self.path)])


class Report(Artifact):
    """report.md; report.html and the PNG plots sit beside it."""

    def fingerprint(self) -> str:
        return _hash_tree(os.path.dirname(self.path), [os.path.basename(self.path)])


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A dataset named by its --dataset value, as dc_core.datasets.open_source reads it.

    The fingerprint covers the name only: a dataset's content is taken not to change under the
    same name, as TFDS versions promise (hashing ImageNet on every run is not an option).
    """
    dataset: str
    data_dir: str = ""
    max_examples: int = 0

    def check(self) -> None:
        """Raises DatasetNotFoundError (saying how to get the data) when it is absent."""
        open_source(self.dataset, self.data_dir, self.max_examples)

    def fingerprint(self) -> str:
        key = f"{self.dataset}\0{self.data_dir}\0{self.max_examples}"
        return hashlib.sha256(key.encode()).hexdigest()

    def record(self) -> dict:
        return {"type": "DatasetRef", **dataclasses.asdict(self),
                "fingerprint": self.fingerprint()}


_TYPES = {cls.__name__: cls for cls in (ModelDir, Export, Metrics, Report)}


def from_record(record: dict):
    """The artifact a metadata.json record describes (the inverse of `record()`)."""
    if record["type"] == "DatasetRef":
        return DatasetRef(record["dataset"], record["data_dir"], record["max_examples"])
    return _TYPES[record["type"]](record["path"])
