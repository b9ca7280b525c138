"""Claiming a run folder: one run at a time, one configuration per folder, resumed from its
newest checkpoint that loads or refused with the reason."""

import fcntl
import json
import os
import shutil
import zipfile
from typing import Optional

import numpy as np
from absl import logging

from dc_tf import checkpoint, config
from dc_tf.run_dir import RunDir


class RunLock:
    """An exclusive lock on the run folder's .lock file holding the owner's PID.

    `flock` locks die with their process, SIGKILL included, so a killed run never leaves a stale
    lock behind.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = RunDir(model_dir).lock
        self._file = None

    def __enter__(self):
        os.makedirs(self.model_dir, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "unknown"
            self._file.close()
            raise config.ConfigError(
                f"--model_dir={self.model_dir} is in use by another run (PID {owner}); wait for "
                "it to finish or choose another --model_dir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def claim(cfg: config.TrainConfig, overwrite: bool = False) -> Optional[str]:
    """Makes MODEL_DIR hold `cfg`'s run; returns the checkpoint to resume from (None: train from
    the first epoch). Call with the RunLock held.

    A folder that `cfg` cannot resume is refused with a ConfigError saying why and the ways out,
    or emptied first with `overwrite`: see `_resume_point`. A saved final clustering that the run
    must not reuse is deleted, so that it is computed again from the checkpoint.

    The scratch folders of multi-worker runs' other workers (workertemp_*) stay: those workers
    are starting alongside the chief and may already have created theirs.
    """
    run = RunDir(cfg.model_dir)
    try:
        resume, epochs_done = _resume_point(cfg)
    except config.ConfigError as e:
        if not overwrite:
            raise
        logging.warning("--overwrite: deleting the run in %s (%s)", cfg.model_dir, e)
        for name in os.listdir(cfg.model_dir):
            target = os.path.join(cfg.model_dir, name)
            if target != run.lock and not RunDir.is_worker_scratch(name):
                (shutil.rmtree if os.path.isdir(target) else os.remove)(target)
        resume, epochs_done = None, 0
    if resume is not None:
        checkpoint.repair_index(os.path.dirname(resume), resume)
    _check_saved_final(run, epochs_done)
    run.write_config(cfg.to_json())
    return resume


def _resume_point(cfg: config.TrainConfig) -> tuple:
    """(the newest checkpoint in MODEL_DIR that loads, its completed epochs), (None, 0) for
    none, once `cfg` may resume the run there. Otherwise a ConfigError: another run's
    configuration (config.check_resumable); a config.json that does not read, or none beside a
    trained run (the flags cannot be checked); a trained run none of whose checkpoints loads
    (training from the first epoch would overwrite it); more epochs trained than --epochs asks
    for (the export would carry a count it was not trained for)."""
    folder = f"--model_dir={cfg.model_dir}"
    run = RunDir(cfg.model_dir)
    trained = _trained(run)
    if run.has_run():
        try:
            with open(run.config, encoding="utf-8") as f:
                saved = config.TrainConfig.from_json(f.read())
        except (ValueError, TypeError) as e:  # not UTF-8, not JSON, or not a configuration
            raise config.ConfigError(
                f"{folder}: its config.json does not read ({' '.join(str(e).split())}), so these "
                "flags cannot be checked against the run's; put the run's config.json back, or "
                "re-run with --overwrite to delete the run") from None
        config.check_resumable(saved, cfg)
    elif trained:
        raise config.ConfigError(
            f"{folder} holds a run ({trained}) but no config.json, so these flags cannot be "
            "checked against the run's; put its config.json back, or re-run with --overwrite "
            "to delete the run")
    resume = checkpoint.newest_that_loads(run.checkpoints)
    if resume is None:
        if trained:
            raise config.ConfigError(
                f"{folder} holds a run ({trained}) but no checkpoint of it that loads, and "
                "training from the first epoch would overwrite it; put back a checkpoint that "
                "loads, or re-run with --overwrite to delete the run")
        return None, 0
    done = checkpoint.completed_epochs(resume)
    if cfg.epochs < done:
        raise config.ConfigError(
            f"--epochs={cfg.epochs} is below the {done} epochs already trained in {folder}; "
            f"re-run with --epochs={done} or more to resume, or with --overwrite to delete the "
            "run and train anew")
    return resume, done


def _trained(run: RunDir) -> str:
    """What in the run folder shows that a run trained there, in words ("": nothing): checkpoint
    files, or metrics of an epoch after the first (a run killed before its first checkpoint
    leaves the first epoch's row, and trains that epoch again)."""
    found = []
    numbers = checkpoint.checkpoint_numbers(run.checkpoints)
    if numbers:
        found.append("checkpoints " + ", ".join(f"ckpt-{n}" for n in sorted(numbers)))
    last = max(run.logged_epochs(), default=0)
    if last > 0:
        found.append(f"{os.path.basename(run.metrics)} rows up to epoch {last}")
    return " and ".join(found)


# What a final clustering file that does not read back raises.
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def _check_saved_final(run: RunDir, epochs_done: int) -> None:
    """Deletes the saved final clustering (which a re-run reuses) when it
    must not be reused by a run resumed after `epochs_done` epochs, saying why: the recluster
    callback then computes it again from the checkpoint, as after a kill."""
    problem = _saved_final_problem(run, epochs_done)
    if problem:
        logging.warning("%s: computing the final clustering again from the checkpoint", problem)
        os.remove(run.final_arrays)


def _saved_final_problem(run: RunDir, epochs_done: int) -> Optional[str]:
    """Why the saved final clustering must not be reused (None: it may be, or there is none):
    one of its files does not read back or does not match the others, or it belongs to more
    epochs than the checkpoint holds (a newer checkpoint did not load: its network is lost)."""
    saved, figures, labels = run.final_arrays, run.final_figures, run.final_assignment
    if not os.path.exists(saved):
        return None  # none yet, or cut short by a kill: computed after the last epoch anyway
    try:
        with np.load(saved) as f:
            final = {name: f[name] for name in f.files}
        epochs = int(final["epochs"])
    except _UNREADABLE as e:
        return f"{saved} does not read ({e})"
    if epochs > epochs_done:
        return (f"{saved} is the clustering after {epochs} epochs, but the checkpoint resumed "
                f"from holds {epochs_done}")
    if epochs < epochs_done:
        return None  # a shorter run's, which this one never reuses
    try:
        with open(figures, encoding="utf-8") as f:
            if json.load(f)["epochs"] != epochs:
                return f"{figures} belongs to another final clustering than {saved}"
    except _UNREADABLE as e:
        return f"{figures} does not read ({e})"
    try:
        if not np.array_equal(np.load(labels), final["labels"]):
            return f"{labels} is not the final clustering of {saved}"
    except _UNREADABLE as e:
        return f"{labels} does not read ({e})"
    return None
