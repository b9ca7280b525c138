"""The model_dir of a run: one run at a time, one configuration per folder."""

import fcntl
import os
import shutil

from absl import logging

from dc_tf import config


class RunLock:
    """An exclusive lock on MODEL_DIR/.lock holding the owner's PID.

    `flock` locks die with their process, SIGKILL included, so a killed run never leaves a stale
    lock behind.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, ".lock")
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


def claim(cfg: config.TrainConfig, overwrite: bool = False) -> None:
    """Makes MODEL_DIR hold `cfg`'s run: refuses another run's folder unless `overwrite`, which
    empties it first. Call with the RunLock held.

    The scratch folders of multi-worker runs' other workers (workertemp_*) stay: those workers
    are starting alongside the chief and may already have created theirs.
    """
    path = os.path.join(cfg.model_dir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = config.TrainConfig.from_json(f.read())
        try:
            config.check_resumable(saved, cfg)
        except config.ConfigError:
            if not overwrite:
                raise
            logging.warning("--overwrite: deleting the run in %s", cfg.model_dir)
            for name in os.listdir(cfg.model_dir):
                if name != ".lock" and not name.startswith("workertemp_"):
                    target = os.path.join(cfg.model_dir, name)
                    (shutil.rmtree if os.path.isdir(target) else os.remove)(target)
    with open(path + ".tmp", "w") as f:
        f.write(cfg.to_json())
    os.replace(path + ".tmp", path)
