"""Failpoints: named places in a run where a reliability test can kill the process.

    DC_TF_FAILPOINT=checkpoint.written:2 python -m dc_tf.train --flagfile=flags/smoke.cfg ...

sends SIGKILL to the process the 2nd time it reaches `checkpoint.written` (`NAME` alone means the
1st time), so tests/reliability can prove that a run killed at that exact moment resumes without
losing or repeating an epoch. Unset (always, outside those tests), `reach` is a no-op. The idea
is FreeBSD's fail points and etcd's gofail; SIGKILL, unlike an exception, runs no cleanup, as
when a machine is lost.

The places, in the order a run reaches them (POINTS): the lock taken, config.json written, a
batch of a feature pass, the PCA fitted, k-means started and done, the epoch's assignment saved,
a training step ended, the epoch's metrics logged, a checkpoint's files written before its index,
the checkpoint index updated, the final clustering saved, the export written to its temporary
folder, the export in place.
"""

import os
import signal

POINTS = ("run.locked", "run.config_written", "features.batch", "pca.fitted", "kmeans.started",
          "kmeans.done", "assignment.saved", "train.batch", "epoch.logged",
          "checkpoint.written", "checkpoint.saved", "final.saved", "export.written",
          "export.done")

ENV = "DC_TF_FAILPOINT"


def _parse(spec: str):
    if not spec:
        return None
    name, _, count = spec.partition(":")
    if name not in POINTS or (count and not count.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected NAME[:N] with NAME one of "
                         f"{', '.join(POINTS)}")
    return name, int(count or 1)


_armed = _parse(os.environ.get(ENV, ""))
_reached = 0


def reach(name: str) -> None:
    """Marks that the run reached `name`; kills the process there if the test armed it."""
    global _reached
    if _armed is None or name != _armed[0]:
        return
    _reached += 1
    if _reached == _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
