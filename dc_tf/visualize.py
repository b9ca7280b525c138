r"""What a trained network and its clusters learned, as pictures.

    python -m dc_tf.visualize filters --model=runs/fashion_mnist --layer=conv3
    python -m dc_tf.visualize top_images --model=runs/fashion_mnist --layer=conv3 --channels=0,5,9
    python -m dc_tf.visualize clusters --model=runs/fashion_mnist --epoch=4
    python -m dc_tf.visualize projector --model=runs/fashion_mnist --num_images=2000

--model is the --model_dir of a dc_tf.train run; the network is rebuilt from its config.json
with the weights of its latest checkpoint.

  filters     gradient ascent (docs/protocols.md §7) for channels of --layer: one PNG grid.
  top_images  for channels of --layer, the --top_k images of --dataset (default: the run's)
              with the highest mean activation: one 3x3 montage per channel, and a JSON list.
  clusters    random clusters of the assignment of --epoch (a number or final), up to 8 images
              each with size, majority label and purity: the image training logs every epoch.
  projector   features of --num_images random training images at --layer (default: the
              clustered feature) for TensorBoard's projector, with a sprite and metadata
              (index, file, cluster of --epoch, label).

--layer defaults to the deepest conv endpoint, --channels to --num_channels channels spread over
the layer. PNGs go to --output_dir (default MODEL_DIR/visualize); the same images, and the
projector files, go to --logdir (default MODEL_DIR/logs/visualize), a run beside the training's
in `tensorboard --logdir=MODEL_DIR/logs`.
"""

import dataclasses
import sys

from absl import app, flags, logging

from dc_tf import data
from dc_tf.config import ConfigError
from dc_tf.visualization.commands import COMMANDS, VisualizeConfig, run

_HELP = {
    "model": "The --model_dir of a dc_tf.train run.",
    "layer": "Endpoint (filters, top_images: default the deepest conv; projector: the clustered "
             "feature).",
    "channels": "Channels of --layer (default: --num_channels spread evenly).",
    "num_channels": "How many channels when --channels is not given.",
    "steps": "Gradient-ascent steps (docs/protocols.md §7: 1000).",
    "learning_rate": "Gradient-ascent step length (0: docs/protocols.md §7's 3, and 30 for conv5).",
    "seed": "Seed of the initial noise (filters) and of the sample (projector).",
    "top_k": "Top-activating images per channel (docs/protocols.md §7: 9).",
    "dataset": "top_images: images to rank (default: the run's training set); same syntax as "
               "dc_tf.train's --dataset.",
    "data_dir": "Data dir of --dataset.",
    "max_examples": "Use the first N examples of --dataset (0 = all).",
    "batch_size": "Images per batch through the network.",
    "epoch": "Assignment of clusters and projector: an epoch number or final.",
    "clusters_shown": "clusters: how many random clusters.",
    "images_per_cluster": "clusters: at most this many images of each.",
    "num_images": "projector: how many random training images.",
    "sprite_size": "projector: thumbnail size in px (0: the image size, at most 64).",
    "output_dir": "PNG folder (default MODEL_DIR/visualize).",
    "logdir": "TensorBoard folder (default MODEL_DIR/logs/visualize).",
}


def _define_flags() -> None:
    """Defines one flag per VisualizeConfig field (here, so importing the module defines none)."""
    for field in dataclasses.fields(VisualizeConfig):
        if field.name == "command":
            continue
        if field.name == "channels":
            flags.DEFINE_list("channels", [], _HELP["channels"])
            continue
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
                  str: flags.DEFINE_string}[field.type]
        define(field.name, None if field.default is dataclasses.MISSING else field.default,
               _HELP[field.name])
    flags.mark_flag_as_required("model")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command: {' | '.join(COMMANDS)} (got {argv[1:]})")
    f = flags.FLAGS
    values = {field.name: f[field.name].value for field in dataclasses.fields(VisualizeConfig)
              if field.name not in ("command", "channels")}
    cfg = VisualizeConfig(command=argv[1], channels=tuple(f.channels), **values)
    try:
        paths = run(cfg)
    except (ConfigError, data.DatasetNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    print("\n".join(paths))


def entry_point():
    """`python -m dc_tf.visualize` (and a console script, if one is declared)."""
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    entry_point()
