"""Python config files and their merge with the command line.

A config file is a ``.py`` file whose top-level variables are settings named like the destinations of
``main.py``'s flags (``--lr_drop`` -> ``lr_drop``, ``--no_aux_loss`` -> ``aux_loss``). Names starting with
``_``, imported modules, functions and classes are not settings. ``_base_ = "other.py"`` (a path relative
to the file, or a list of them, applied in order) inherits another config; the file's own values override
the inherited ones, and inheritance may chain.

Config files are code: loading one executes it with the full Python interpreter, exactly like running it.
Only use config files you wrote or trust.

Precedence: parser defaults < config file (< its bases' values overridden by it) < command-line flags.
:func:`parse_args` records which settings the config file or the command line gave (``args.given_flags``), so
that values a checkpoint recorded replace only the parser defaults, never a given flag.
"""
import argparse
import difflib
import inspect
import json
import os
import runpy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Union

PathLike = Union[str, os.PathLike]


class ConfigError(ValueError):
    """A config file is malformed or sets something the parser does not know; the message names the file."""


def load_config(path: PathLike) -> Dict[str, Any]:
    """The settings of config file ``path`` with its ``_base_`` chain resolved (base first, then overrides)."""
    return _load(Path(path), ())


def _load(path: Path, chain: Tuple[Path, ...]) -> Dict[str, Any]:
    if not path.is_file():
        inherited_by = f" (the _base_ of {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file {path} does not exist{inherited_by}")
    if path.suffix != ".py":
        raise ConfigError(f"config file {path}: config files are Python files (.py)")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError("circular _base_ chain: " + " -> ".join(str(p) for p in chain + (resolved,)))
    try:
        variables = runpy.run_path(str(path))  # executes the file: configs are code
    except Exception as error:
        raise ConfigError(f"config file {path} failed to run: {type(error).__name__}: {error}") from error

    settings: Dict[str, Any] = {}
    base = variables.get("_base_")
    bases = [] if base is None else [base] if isinstance(base, (str, os.PathLike)) else list(base)
    for base_path in bases:
        settings.update(_load(path.parent / base_path, chain + (resolved,)))
    settings.update({name: value for name, value in variables.items()
                     if not name.startswith("_") and not inspect.ismodule(value) and not callable(value)})
    return settings


def _settable_actions(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions
            if action.dest not in (argparse.SUPPRESS, "help", "config")}


def _type_matches(value: Any, expected) -> bool:
    if value is None or expected not in (int, float, str):
        return True
    if isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _check_value(action: argparse.Action, key: str, value: Any, config_path: PathLike) -> Any:
    """``value`` checked against the flag's kind, type and choices; tuples become lists."""
    where = f"config file {config_path}: {key} = {value!r}"
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {action.option_strings[0]} is a switch, expected True or False")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {action.option_strings[0]} takes a list")
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ConfigError(f"{where}: {action.option_strings[0]} takes exactly {action.nargs} values")
        values = list(value)
    else:
        values = [value]
    for item in values:
        if not _type_matches(item, action.type or str):
            raise ConfigError(f"{where}: expected {(action.type or str).__name__} values")
        if action.choices is not None and item is not None and item not in action.choices:
            raise ConfigError(f"{where}: must be one of {list(action.choices)}")
    return values if isinstance(value, (list, tuple)) else value


def validate_config(settings: Dict[str, Any], parser: argparse.ArgumentParser, config_path: PathLike) -> Dict[str, Any]:
    """Check every setting is a destination of ``parser`` with a value of the right kind.

    Raises :class:`ConfigError` naming the file and the key, with the closest known name for typos.
    """
    actions = _settable_actions(parser)
    checked = {}
    for key, value in settings.items():
        if key == "config":
            raise ConfigError(f"config file {config_path}: 'config' cannot be set inside a config file "
                              "(use _base_ to inherit another file)")
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config file {config_path}: unknown setting {key!r}{hint}; settings are the "
                              "destinations of the command-line flags (e.g. --lr_drop -> lr_drop)")
        checked[key] = _check_value(actions[key], key, value, config_path)
    return checked


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the settings of ``--config FILE`` (if given) as the defaults.

    Flags given explicitly on the command line override the config file. The config's values become
    the parser's defaults (``parser.set_defaults``), so ``parser.get_default`` reports them afterwards;
    flags the parser marks required are satisfied by the config file too. A bad config exits with a
    usage error naming the file and the setting. ``args.given_flags`` lists the destinations that the
    config file or the command line set (see :func:`given_flags`).
    """
    config_flags = [a.option_strings for a in parser._actions if a.dest == "config"]
    pre_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre_parser.add_argument(*(config_flags[0] if config_flags else ["--config"]), dest="config", default=None)
    known, _ = pre_parser.parse_known_args(argv)
    settings = {}
    if known.config:
        try:
            settings = validate_config(load_config(known.config), parser, known.config)
        except (ConfigError, FileNotFoundError) as error:
            parser.error(str(error))
        for action in parser._actions:
            if action.dest in settings:
                action.required = False
        parser.set_defaults(**settings)
    args = parser.parse_args(argv)
    args.given_flags = sorted(_command_line_dests(parser, argv) | set(settings))
    return args


def _command_line_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Set[str]:
    """Destinations of the flags present in ``argv`` (a value equal to the default included)."""
    unset, dests = object(), set(_settable_actions(parser))
    namespace = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(dests, unset)))[0]
    return {dest for dest in dests if getattr(namespace, dest) is not unset}


def given_flags(args: argparse.Namespace, defaults: argparse.ArgumentParser) -> Set[str]:
    """The destinations a config file or the command line set: ``args.given_flags`` as recorded by
    :func:`parse_args`; for a namespace parsed otherwise, the ones that differ from ``defaults``' defaults."""
    if hasattr(args, "given_flags"):
        return set(args.given_flags)
    return {dest for dest, value in vars(args).items() if value != defaults.get_default(dest)}


def save_config(args: Union[argparse.Namespace, Dict[str, Any]], path: PathLike) -> None:
    """Write the resolved settings to ``path`` (normally ``<output_dir>/config.json``): sorted, indented JSON."""
    settings = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, sort_keys=True, indent=2, default=str) + "\n")
