"""RunDir: the run folder (--model_dir) of one training run. It is the only place that names the
folder's files, and it reads and writes the run's record.

The layout is public (downstream tools read it):

    config.json               the resolved configuration, as `TrainConfig.to_json`
    examples.tsv              index, source and label of every training image
    metrics.jsonl             one JSON row of figures per trained epoch
    logs/                     TensorBoard summaries
    checkpoints/              the checkpoints a killed run resumes from
    assignments/epoch_NNNN.npy  int32 [N] cluster of every image during epoch NNNN (-1: none)
    assignments/final.npy     the final clustering of the trained network
    final_clustering.npz      that clustering with its PCA and centroids (what `assign` uses)
    final_clustering.json     its figures (NMI, k-means loss, ...)
    skipped.tsv               the images that could not be read, with the reason
    report.html               the run's page
    export/                   the SavedModel for downstream tasks
    workertemp_N/             scratch folder of worker N of a multi-worker run
    .lock                     held by the run that owns the folder
"""

import csv
import json
import os
import re
from typing import Optional

import numpy as np
from absl import logging

from dc_core import fileio


class RunDir:
    """The paths and the record of the run folder at `path`."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self):
        return f"RunDir({self.path!r})"

    def _join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    # ------------------------------------------------------------------------------- paths
    config = property(lambda self: self._join("config.json"))
    examples = property(lambda self: self._join("examples.tsv"))
    metrics = property(lambda self: self._join("metrics.jsonl"))
    logs = property(lambda self: self._join("logs"))
    checkpoints = property(lambda self: self._join("checkpoints"))
    assignment_dir = property(lambda self: self._join("assignments"))
    final_assignment = property(lambda self: self._join("assignments", "final.npy"))
    final_arrays = property(lambda self: self._join("final_clustering.npz"))
    final_figures = property(lambda self: self._join("final_clustering.json"))
    skipped = property(lambda self: self._join("skipped.tsv"))
    report = property(lambda self: self._join("report.html"))
    export = property(lambda self: self._join("export"))
    lock = property(lambda self: self._join(".lock"))
    # The suggested output of the linear probe on this run's export.
    probe = property(lambda self: self._join("probe.json"))

    def epoch_assignment(self, epoch: int) -> str:
        return self._join("assignments", f"epoch_{epoch:04d}.npy")

    def worker_scratch(self, task_id: int) -> "RunDir":
        """The scratch folder of worker `task_id` of a multi-worker run, as a RunDir."""
        return RunDir(self._join(f"workertemp_{task_id}"))

    @staticmethod
    def is_worker_scratch(name: str) -> bool:
        return name.startswith("workertemp_")

    def record(self) -> list:
        """The record of a finished run that identifies it (not its checkpoints): the paths of
        config.json, metrics.jsonl, final_clustering.json and every assignment file present."""
        files = [p for p in (self.config, self.metrics, self.final_figures) if os.path.exists(p)]
        if os.path.isdir(self.assignment_dir):
            files += [os.path.join(self.assignment_dir, name)
                      for name in sorted(os.listdir(self.assignment_dir))]
        return files

    # ------------------------------------------------------------------------------- config
    def has_run(self) -> bool:
        return os.path.exists(self.config)

    def write_config(self, text: str) -> None:
        fileio.atomic_write(self.config, text)

    def config_fields(self) -> dict:
        """config.json's fields as JSON (OSError, ValueError when missing or unreadable)."""
        with open(self.config, encoding="utf-8") as f:
            return json.load(f)

    # ------------------------------------------------------------------------------ metrics
    def metrics_lines(self) -> list:
        """(line, row or None) for every line of metrics.jsonl; [] when there is none. The row
        is None for a line that is not a whole row (cut short by a kill, or garbled)."""
        if not os.path.exists(self.metrics):
            return []
        with open(self.metrics, "rb") as f:
            return [(line, _row_of(line)) for line in f]

    def logged_epochs(self) -> list:
        """The epochs of metrics.jsonl's whole rows, in file order."""
        return [row["epoch"] for row in self.read_metrics()]

    def read_metrics(self) -> list:
        """metrics.jsonl's rows as dicts ([] for a run without epochs); lines that are not
        whole rows (a run killed while appending) are left out."""
        return [row for _, row in self.metrics_lines() if row is not None]

    def truncate_metrics(self, before_epoch: int) -> None:
        """Keeps the rows of epochs before `before_epoch`: drops those of later epochs (written
        by a run killed before their checkpoint, or trained after a checkpoint that no longer
        loads) and, with a warning naming it, any line that is not a whole row, so that the
        next row starts a line of its own."""
        rows = self.metrics_lines()
        keep = []
        for number, (line, row) in enumerate(rows, 1):
            if row is None:
                if line.strip():
                    logging.warning("%s line %d is not a metrics row, dropped: %r", self.metrics,
                                    number, line[:80])
            elif row["epoch"] < before_epoch:
                keep.append(line if line.endswith(b"\n") else line + b"\n")
        if keep != [line for line, _ in rows]:
            fileio.atomic_write(self.metrics, b"".join(keep))

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    # -------------------------------------------------------------------------- assignments
    def save_assignment(self, epoch, labels: np.ndarray) -> None:
        """Saves the clustering of `epoch` (an epoch number, or "final"), atomically."""
        save_array(self.final_assignment if epoch == "final" else self.epoch_assignment(epoch),
                   labels)

    def load_assignment(self, epoch="final") -> np.ndarray:
        """int32 [N] cluster of every example after `epoch` ("final", or an epoch number)."""
        path = self.final_assignment if epoch == "final" else self.epoch_assignment(int(epoch))
        if not os.path.exists(path):
            found = sorted(os.listdir(self.assignment_dir))
            raise FileNotFoundError(f"--epoch={epoch}: no {path}; this run has "
                                    f"{', '.join(found)}")
        return np.load(path)

    def previous_assignment(self, epoch: int) -> Optional[np.ndarray]:
        """The assignment saved for epoch - 1, if any (nmi_prev of a resumed run's first epoch);
        a file that does not read is reported and taken as missing."""
        path = self.epoch_assignment(epoch - 1)
        if epoch == 0 or not os.path.exists(path):
            return None
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as e:
            logging.warning("%s does not read (%s): the first epoch of this re-run has no "
                            "nmi_prev", path, " ".join(str(e).split())[:200])
            return None

    def last_assignment(self):
        """(what, int32 [N] pseudo-labels) of the newest clustering of a run ("final
        clustering" or "epoch E"), else None. Supervised runs have none: they train on the
        labels."""
        if self.config_fields().get("supervised"):
            return None
        folder = self.assignment_dir
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        epochs = [n for n in names if re.fullmatch(r"epoch_\d+\.npy", n)]
        for name, what in (("final.npy", "final clustering"),
                           *((n, f"epoch {int(n[6:-4])}") for n in reversed(epochs))):
            if name in names:
                try:
                    return what, np.load(os.path.join(folder, name))
                except (OSError, ValueError, EOFError):
                    continue  # a damaged file: the one before it
        return None

    # ----------------------------------------------------------------------------- examples
    def load_examples(self, num_examples: int) -> tuple:
        """(sources: list of str, labels: int64 [N], -1 where unknown) from examples.tsv, which
        must list the `num_examples` examples that the assignments index."""
        try:
            with open(self.examples, encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t"))
            labels = np.array([int(r["label"]) if r["label"] else -1 for r in rows], np.int64)
        except (UnicodeDecodeError, KeyError, TypeError, ValueError):
            rows = None
        if rows is None or len(rows) != num_examples or any(
                r["index"] != str(i) for i, r in enumerate(rows)):
            raise ValueError(f"{self.examples} does not list the {num_examples} examples of the "
                             "assignments (damaged or edited): re-run the training command of "
                             "this run, which writes it again")
        return [r["source"] for r in rows], labels

    # ---------------------------------------------------------------------- final clustering
    def final_figures_or_none(self) -> Optional[dict]:
        """final_clustering.json's figures; None when the run has none (yet) or it does not
        read."""
        try:
            with open(self.final_figures, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None


def _row_of(line: bytes) -> Optional[dict]:
    """A metrics.jsonl line's row (None: not a whole row with its epoch: cut short or
    garbled)."""
    try:
        row = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
    except ValueError:
        return None
    epoch = row.get("epoch") if isinstance(row, dict) else None
    return row if isinstance(epoch, int) else None


def save_array(path: str, array: np.ndarray) -> None:
    """np.save, atomically (fileio): a killed run never leaves half an array."""
    with fileio.atomic_open(path, "wb") as f:
        np.save(f, array)
