r"""Runs a pipeline of pipelines/definitions.py under a root folder, cached and resumable.

    python -m pipelines.run --pipeline=fashion_mnist --root=runs/pipeline_fmnist
    python -m pipelines.run --pipeline=fashion_mnist --root=runs/pipeline_fmnist --force=Report
    python -m pipelines.run --pipeline=fashion_mnist --root=runs/pipeline_fmnist --only=LinearProbe
    python -m pipelines.run --pipeline=imagenet_alexnet --root=runs/alexnet --data_dir=/data/tfds

Each component writes ROOT/<component>/ with its outputs and metadata.json. A second run of the
same command skips every component whose inputs, config and code are unchanged; after a failure
it resumes (training from its checkpoints). Exit status 1 when a component failed or was blocked.
"""

import os
import sys

from absl import app, flags

from dc_core.errors import ConfigError, DatasetNotFoundError
from dc_tf import train_flags
from pipelines import engine
from pipelines.definitions import PIPELINES


def _define_flags() -> None:
    """Defines this program's flags (here, so that importing the module defines none).

    Not marked required: the components re-parse the training flags of dc_tf.train_flags in this
    process, and a required-flag validator would fire on those parses.
    """
    flags.DEFINE_enum("pipeline", None, sorted(PIPELINES), "The pipeline to run.")
    flags.DEFINE_string("root", None, "Pipeline root: ROOT/<component>/ holds each component's "
                                      "outputs and metadata.json; re-using it resumes.")
    flags.DEFINE_string("only", "", "Run only this component, reading its inputs from the "
                                    "records of earlier runs under --root.")
    flags.DEFINE_multi_string("force", [], "Re-run this component even when it is cached "
                                           "(repeat the flag for several).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.pipeline or not f.root:
        raise app.UsageError(f"give --pipeline ({', '.join(sorted(PIPELINES))}) and --root=DIR")
    # dc_tf.train_flags, imported by the components, defines the training flags in this process;
    # of those only --data_dir means something here: the rest come from each pipeline's flagfile.
    stray = sorted(f"--{flag.name}" for flag in f.get_flags_for_module(train_flags.__name__)
                   if flag.present and flag.name != "data_dir")
    if stray:
        raise app.UsageError(f"{', '.join(stray)}: training flags are set by the pipeline's "
                             "definition (pipelines/definitions.py), not on this command line")
    root, only, force = f.root, f.only, tuple(f.force)
    data_dir = os.path.abspath(f.data_dir) if f.data_dir else ""
    pipeline = PIPELINES[f.pipeline](data_dir)
    try:
        outcomes = engine.run_pipeline(pipeline, root, only, force)
    except (ConfigError, DatasetNotFoundError) as e:
        sys.exit(f"error: pipeline {pipeline.name}: {e}")

    width = max(len(o.component) for o in outcomes)
    for outcome in outcomes:
        print(f"{outcome.component:<{width}}  {outcome.state:<8} {outcome.detail}")
    failed = [o.component for o in outcomes if o.state == "failed"]
    if failed:
        records = ", ".join(engine.metadata_path(os.path.abspath(root), n) for n in failed)
        sys.exit(f"{', '.join(failed)} failed (blocking their consumers); the errors are in "
                 f"{records}. Fix them and run the same command again: completed components "
                 "are cached.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
