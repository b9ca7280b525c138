"""Command-line plumbing shared by the evaluation programs: one absl flag per config field.

Each program keeps its configuration in a frozen dataclass whose field names are its flags. It
calls `define_flags` from its entry point only (importing a program defines no flag, so programs
and dc_tf.train can share a process), and `parse_lists` turns its comma-separated list flags into
typed tuples.
"""

import dataclasses

from absl import flags

from dc_core.errors import ConfigError

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def define_flags(config_class, help_texts: dict, skip: tuple = (), lists: tuple = ()) -> None:
    """Defines one flag per field of `config_class`, typed by its annotation.

    Args:
      config_class: the program's config dataclass (field types bool, int, float, str, tuple).
      help_texts: field name -> help text.
      skip: fields the program defines itself.
      lists: tuple fields defined as comma-separated lists (default: the field's default).
    """
    for field in dataclasses.fields(config_class):
        name, default, help_text = field.name, field.default, help_texts[field.name]
        if name in skip:
            continue
        if name in lists:
            flags.DEFINE_list(name, [str(v) for v in default], help_text)
        else:
            _DEFINE[field.type](name, None if default is dataclasses.MISSING else default,
                                help_text)


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
