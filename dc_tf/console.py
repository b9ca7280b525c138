"""What a training run prints: TensorFlow's start-up lines left out, progress, a closing block.

TensorFlow's C++ side prints a dozen lines while it loads and looks for devices, before absl's
logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot hold them back; on a machine without a
GPU one of them is `E0000 ... failed call to cuInit`, which reads as a failure and is none.
`quiet_tensorflow_startup` loads TensorFlow with those lines filtered out (every other line is
passed on) and sets TF_CPP_MIN_LOG_LEVEL=2 for the C++ INFO and WARNING lines that come later
(XLA's service, once per run). A TF_CPP_MIN_LOG_LEVEL of the user's own wins: with it set,
nothing is filtered.
"""

import logging
import os
import re
import sys
import tempfile

from dc_tf.run_dir import RunDir

# The start-up lines: absl's note, then INFO/WARNING lines stamped 0000 00:00 (the time before
# logging is initialised) and the continuation of the CPU-instructions line.
_STARTUP_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)"
                            r"|To enable the following instructions:"
                            r"|[IW]0000 00:00:\d+\.\d+ +\d+ \S+:\d+\]")
_NO_CUDA_DEVICE = re.compile(r"E0000 00:00:\d+\.\d+ +\d+ \S+:\d+\] failed call to cuInit")
NVIDIA_DRIVER = "/proc/driver/nvidia/version"  # present where an NVIDIA driver is loaded


def keep_startup_line(line: str, gpu_driver: bool) -> bool:
    """Whether a line TensorFlow printed while loading is worth showing: not start-up noise,
    and not cuInit's failure on a machine without an NVIDIA driver (where it is expected)."""
    return not (_STARTUP_NOISE.match(line) or (not gpu_driver and _NO_CUDA_DEVICE.match(line)))


def quiet_tensorflow_startup() -> None:
    """Imports TensorFlow and lists its GPUs with the C++ start-up lines filtered out of the
    process's stderr (see the module's docstring). Call it before anything imports TensorFlow;
    it does nothing when TF_CPP_MIN_LOG_LEVEL is set or TensorFlow is loaded already."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    gpu_driver = os.path.exists(NVIDIA_DRIVER)
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)  # the C++ side writes to the descriptor, not sys.stderr
        try:
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")  # CUDA's initialisation prints here
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines():
                if keep_startup_line(line, gpu_driver):
                    sys.stderr.write(line + "\n")
            sys.stderr.flush()


class _LibraryInfoFilter(logging.Filter):
    """Lets through every record of level WARNING and above, and the INFO records of every
    module outside TensorFlow and Keras (their INFO lines: checkpoint sharding, signature
    renaming, fingerprints, written at every save)."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        return record.levelno >= logging.WARNING or not (
            "/tensorflow/" in path or "/keras/" in path or "/tf_keras/" in path)


def quiet_library_info() -> None:
    """Leaves TensorFlow's and Keras's INFO lines out of the program's log (absl's handler);
    with --verbosity=1 (debug) they stay."""
    from absl import logging as absl_logging
    if not absl_logging.level_debug():
        absl_logging.get_absl_handler().addFilter(_LibraryInfoFilter())
        logging.getLogger("tensorflow").setLevel(logging.WARNING)  # its own handler's lines


def figure(value) -> str:
    """A metric as text: 4 significant digits, "-" for None."""
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def interactive() -> bool:
    """Whether the output is a terminal: Keras's progress bar then, else a line per interval."""
    return sys.stdout.isatty()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes
            else f"{seconds} s")


def closing_block(cfg, seconds: float) -> str:
    """What a finished run says last: where its export and report are, the final figures, and
    the commands to go on with. `cfg`: the run's resolved TrainConfig."""
    model_dir = cfg.model_dir
    run = RunDir(model_dir)
    export = run.export
    method = cfg.describe()[0]
    lines = ["", "=" * 72,
             f"Finished: {method} on {cfg.dataset} ({cfg.num_examples} images), {cfg.epochs} "
             f"epochs; this command ran {_duration(seconds)}."]
    final = run.final_figures_or_none()
    if final is not None:
        figures = [f"{final.get('empty_clusters', 0)} empty clusters"]
        for key, text in (("nmi_labels", "NMI with the labels"),
                          ("nmi_prev", "NMI with the last epoch's")):
            if final.get(key) is not None:
                figures.insert(0, f"{text} {final[key]:.3f}")
        lines.append("Final clustering: " + ", ".join(figures) + ".")
    lines += [f"  export   {export}",
              f"  report   {run.report}  (open it in a browser)",
              f"  metrics  {run.metrics}",
              "Next:"]
    if cfg.dataset.startswith("fashion_mnist"):
        lines.append(f"  evaluate:       python -m eval.linear_probe --dataset=fashion_mnist "
                     f"--model={export} --output={run.probe}")
    else:
        lines.append("  evaluate:       the README's \"Evaluating\" table (linear probes on a "
                     "labelled data set, VOC, retrieval)")
    lines += [f"  assign images:  python -m dc_tf.assign --model={export} "
              "--input=folder:NEW_IMAGES --output=assigned.csv",
              f"  see clusters:   python -m dc_tf.clusters --model_dir={model_dir}",
              f"  TensorBoard:    tensorboard --logdir={run.logs}",
              "=" * 72]
    return "\n".join(lines)
