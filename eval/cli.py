"""Command-line plumbing shared by the evaluation programs: one absl flag per config field.

Each program keeps its configuration in a frozen dataclass whose field names are its flags. It
calls `define_flags` from its entry point only (importing a program defines no flag, so programs
and dc_tf.train can share a process), and `parse_lists` turns its comma-separated list flags into
typed tuples. `run_program` is every program's entry point: flags, run, the error line or the
table. `require_given`, `check_each`, `choice` and `default_logdir` are the checks and defaults
their `validate` functions share; `log_config` and `write_report` the start and end of a run.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags, logging

from dc_core.errors import ConfigError, DatasetNotFoundError
from dc_core.fileio import atomic_write

# The flags of every program, worded once.
COMMON_HELP = {
    "model": "MODEL_DIR/export of a dc_tf.train run.",
    "output": "The JSON file to write.",
    "logdir": "TensorBoard folder (default: OUTPUT_logs beside --output).",
}

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_flags(config_class, help_texts: dict, skip: tuple = (), lists: tuple = (),
                 required: tuple = ()) -> None:
    """Defines one flag per field of `config_class`, typed by its annotation.

    Args:
      config_class: the program's config dataclass (field types bool, int, float, str, tuple).
      help_texts: field name -> help text (COMMON_HELP's where it has none).
      skip: fields the program defines itself.
      lists: tuple fields defined as comma-separated lists (default: the field's default).
      required: flags that must be given (the program's own ones included).
    """
    for field in dataclasses.fields(config_class):
        name, default = field.name, field.default
        help_text = help_texts.get(name) or COMMON_HELP[name]
        if name in skip:
            continue
        if name in lists:
            flags.DEFINE_list(name, [str(v) for v in default], help_text)
        else:
            _DEFINE[field.type](name, None if default is dataclasses.MISSING else default,
                                help_text)
    flags.mark_flags_as_required(list(required))


def flag_values(config_class, skip: tuple = ()) -> dict:
    """The parsed value of each field's flag, except `skip`."""
    return {field.name: flags.FLAGS[field.name].value for field in dataclasses.fields(config_class)
            if field.name not in skip}


def parse_lists(values: dict, kinds: dict) -> dict:
    """`values` with each list flag in `kinds` (name -> int or float) converted to a tuple.

    Raises:
      ConfigError: a value that is not a number of its kind, naming the flag.
    """
    values = dict(values)
    for flag, kind in kinds.items():
        try:
            values[flag] = tuple(kind(v) for v in values[flag])
        except ValueError as e:
            raise ConfigError(f"--{flag}={','.join(values[flag])}: {e}; give "
                              f"comma-separated {kind.__name__} values") from e
    return values


def run_program(define, make_config, run, table) -> None:
    """A program's entry point: `define()` its flags, then parse them and print
    table(run(make_config())); a ConfigError or DatasetNotFoundError (from any of them) ends the
    program with one line, "error: MESSAGE", instead of a traceback."""
    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            report = run(make_config())
        except (ConfigError, DatasetNotFoundError) as e:
            logging.error("%s", e)
            sys.exit(f"error: {e}")
        print(table(report))

    define()
    app.run(main)


# ------------------------------------------------------------------------------ validate

def require_given(cfg, **examples: str) -> None:
    """Fails unless every field named is given: "give --model=MODEL_DIR/export, ... and
    --output=FILE.json" (the keywords' order and example values)."""
    if not all(getattr(cfg, name) for name in examples):
        given = [f"--{name}={example}" for name, example in examples.items()]
        raise ConfigError(f"give {', '.join(given[:-1])} and {given[-1]}")


def check_each(cfg, names: tuple, ok=lambda value: value > 0,
               wording: str = "must be positive") -> None:
    """Fails on the first field in `names` whose value is not ok: "--NAME=VALUE WORDING"."""
    for name in names:
        value = getattr(cfg, name)
        if not ok(value):
            raise ConfigError(f"--{name}={value} {wording}")


def choice(flag: str, value: str, allowed: tuple) -> None:
    """Fails unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"--{flag}={value} is unknown; choose one of {', '.join(allowed)}")


def default_logdir(cfg) -> str:
    """--logdir, or OUTPUT_logs beside --output."""
    return cfg.logdir or os.path.splitext(cfg.output)[0] + "_logs"


# ------------------------------------------------------------------------------ the run

def log_config(cfg) -> None:
    """Logs the validated configuration as one JSON line."""
    logging.info("configuration: %s", json.dumps(dataclasses.asdict(cfg)))


def write_report(path: str, report: dict) -> None:
    """Writes the JSON report atomically (its folder created)."""
    atomic_write(path, json.dumps(report, indent=1))
