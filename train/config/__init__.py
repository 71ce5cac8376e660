"""Run configuration as data: frozen dataclasses per concern, the command line generated from them, YAML
recipes, plain-data round trips and the resume comparison.

A config class is a frozen dataclass whose fields are *concerns* (``model: PretrainModel =
field(default_factory=PretrainModel)``), each a frozen dataclass of *options* declared with
``option(default, help, policy, ...)`` and shown as one argument group (titled by the concern class's
``TITLE``, else by the field's name). An option is one flag, ``--<field name>`` of the field's annotated
type, and carries its resume policy:

- ``Policy.MATCH``: another value makes another experiment; a resumed run with it is refused;
- ``Policy.WARN``: may change when a run resumes; the change is logged ("--name old -> new");
- ``Policy.FREE``: not compared (what to resume from, where to stop, which recipe file was read).

    parser = generate_parser(PretrainConfig, prog="python -m train.pretrain", description="...")
    resolved = parse_command_line(PretrainConfig, make_parser, argv, resolve)  # --config FILE read; bad: exit 2
    to_dict(config)            # {"model": {...}, "optim": {...}, ...}: plain, JSON-able, what checkpoints store
    from_dict(PretrainConfig, data)
    compare(saved_settings(checkpoint), config)   # (refused, warned), each "--name old -> new"

Recipe files (``--config FILE``): a YAML mapping of flag names, without the dashes, to values, FLAT (not
nested by concern), e.g. ``batch_size: 256``; comments are free. Precedence: flags given on the command line
override the file, the file overrides the defaults. A key that is not a flag of the command (or that names
an option the command does not offer) is refused with one line naming the key and the file. ``to_yaml``
writes a config in the same format, so a run's resolved ``config.yaml`` is itself a recipe.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import math
import os
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import Field, dataclass, field, fields, is_dataclass, make_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from train.files import replace_atomically

R = TypeVar("R")  # what a command's resolve function returns

OPTION = "option"  # field metadata key of an option
CONFIG_FLAG = "config"  # the option that names a recipe file: read by parse_command_line, never in a recipe
CONFIG_FILE = "config.yaml"  # a run's resolved configuration, in its output folder (write_run_config)


class Policy(enum.Enum):
    """What a resumed run does when an option's value differs from the checkpoint's."""

    MATCH = "match"  # refused: the value defines the experiment
    WARN = "warn"  # accepted, with a warning naming old -> new
    FREE = "free"  # not compared


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the flag, the value and the fix."""


@dataclass(frozen=True)
class Option:
    """The metadata of one option: its help text, resume policy and command-line details."""

    help: str
    policy: Policy
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # checked by check_ranges (None values pass)
    finite: bool = False  # with minimum: "must be a finite number >= minimum"
    negatable: bool = False  # a bool option as --name / --no-name (BooleanOptionalAction), else store_true
    metavar: str | None = None  # the value's name in --help (argparse's default: the flag upper-cased)
    cli: bool = True  # False: fixed at its default for this command (specialise(hidden=...)): no flag, no recipe key
    # MATCH only: (saved settings, current settings) -> a note when the difference does not matter (then a
    # warning "--name old -> new (note)" instead of a refusal), else None.
    relax: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None] | None = None


def option(default: Any, help: str, policy: Policy, *, choices: Collection[Any] | None = None,
           minimum: float | None = None, finite: bool = False, negatable: bool = False, metavar: str | None = None,
           relax: Callable[[Mapping[str, Any], Mapping[str, Any]], str | None] | None = None) -> Any:
    """Declare an option field (see the module docstring); its type is the field's annotation."""
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy, got {policy!r}")
    if relax is not None and policy is not Policy.MATCH:
        raise TypeError("relax= applies to Policy.MATCH options only")
    meta = Option(help, policy, tuple(choices) if choices is not None else None, minimum, finite, negatable,
                  metavar, relax=relax)
    return field(default=default, metadata={OPTION: meta})


def recipe_option(where: str) -> Any:
    """Declare the ``--config FILE`` option (free on resume), naming where the command's recipes are."""
    return option(None, f"a YAML recipe ({where}): flag names without the dashes as keys; flags given here override "
                        "it (default: none)", Policy.FREE, metavar="FILE")


# -- walking a config class ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    """One option of a config class, as the machinery sees it."""

    concern: str  # the concern's field name, e.g. "optim"
    name: str  # the option's field name = its flag without the dashes
    type: type  # int, float, str or bool (Optional stripped)
    optional: bool  # None is a valid value
    default: Any
    meta: Option


def concern_fields(cls: type) -> list[Field]:
    """The concern fields of a config class: those whose default is built by a dataclass."""
    return [f for f in fields(cls) if isinstance(f.default_factory, type) and is_dataclass(f.default_factory)]


def concern_title(concern_field: Field) -> str:
    return getattr(concern_field.default_factory, "TITLE", concern_field.name)


def option_specs(cls: type) -> list[OptionSpec]:
    """Every option of a config class (instance or class), in declaration order."""
    cls = cls if isinstance(cls, type) else type(cls)
    specs = []
    for cf in concern_fields(cls):
        sub = cf.default_factory
        hints = typing.get_type_hints(sub)
        for f in fields(sub):
            where = f"{sub.__name__}.{f.name}"
            if not isinstance(f.metadata.get(OPTION), Option):
                raise TypeError(f"{where} is not declared with option(): every option needs its help text and its "
                                "resume policy")
            kind, optional = _base_type(hints[f.name], where)
            specs.append(OptionSpec(cf.name, f.name, kind, optional, f.default, f.metadata[OPTION]))
    return specs


def _base_type(hint: Any, where: str) -> tuple[type, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    if len(kinds) != 1 or kinds[0] not in (int, float, str, bool):
        raise TypeError(f"{where}: an option is an int, float, str or bool (or Optional of one), got {hint!r}")
    return kinds[0], optional


def specialise(cls: type, name: str, defaults: Mapping[str, Any] | None = None, hidden: Collection[str] = ()) -> type:
    """A subclass of the config class ``cls`` whose options ``defaults`` (by flag name) have other defaults and
    whose ``hidden`` options are fixed at their default: not on its command line, not accepted in a recipe
    (e.g. fine-tuning and probing share one config with per-command defaults and flags)."""
    defaults = dict(defaults or {})
    unknown = sorted((set(defaults) | set(hidden)) - {s.name for s in option_specs(cls)})
    if unknown:
        raise ValueError(f"specialise({cls.__name__}): no such option(s) {unknown}")
    concerns = []
    for cf in concern_fields(cls):
        sub = cf.default_factory
        hints = typing.get_type_hints(sub)
        changed = []
        for f in fields(sub):
            if f.name in defaults or f.name in hidden:
                meta = f.metadata[OPTION]
                meta = replace(meta, cli=meta.cli and f.name not in hidden)
                changed.append((f.name, hints[f.name], field(default=defaults.get(f.name, f.default),
                                                              metadata={OPTION: meta})))
        if changed:
            sub = make_dataclass(sub.__name__, changed, bases=(sub,), frozen=True)
        concerns.append((cf.name, sub, field(default_factory=sub)))
    special = make_dataclass(name, concerns, bases=(cls,), frozen=True)
    special.__module__ = cls.__module__
    inherited = {f.default_factory for f in concern_fields(cls)}
    for _, sub, _ in concerns:  # new concern classes: reachable as <name>.<class name>, so that instances pickle
        if sub not in inherited:
            sub.__module__, sub.__qualname__ = cls.__module__, f"{name}.{sub.__name__}"
            setattr(special, sub.__name__, sub)
    return special


# -- the command line ------------------------------------------------------------------------------------


class DefaultsOnceHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, once: ``(default: X)`` is appended unless the help already
    states the default itself (written as "(default: ...)" where the value needs words, e.g. "the model's",
    or as ``%(default)s``, which BooleanOptionalAction adds on some Python versions)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text or "%(default)" in help_text or action.default is argparse.SUPPRESS:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()


def generate_parser(cls: type, *, prog: str, description: str,
                    defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command line of config class ``cls``: one argument group per concern, one flag per option (its
    name, type, choices, default and help), skipping options fixed for this command. ``defaults`` (by flag
    name, e.g. a recipe file's values) replace the declared defaults."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsOnceHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    titles = {cf.name: concern_title(cf) for cf in concern_fields(cls)}
    for spec in option_specs(cls):
        if not spec.meta.cli:
            continue
        if spec.concern not in groups:
            groups[spec.concern] = parser.add_argument_group(titles[spec.concern])
        kwargs: dict[str, Any] = {"default": defaults.get(spec.name, spec.default), "help": spec.meta.help}
        if spec.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if spec.meta.negatable else "store_true"
        else:
            if spec.type is not str:
                kwargs["type"] = spec.type
            if spec.meta.choices is not None:
                kwargs["choices"] = spec.meta.choices
            if spec.meta.metavar is not None:
                kwargs["metavar"] = spec.meta.metavar
        groups[spec.concern].add_argument(f"--{spec.name}", **kwargs)
    return parser


def parse_command_line(cls: type, make_parser: Callable[[Mapping[str, Any]], argparse.ArgumentParser],
                       argv: list[str] | None, resolve: Callable[[Any], R]) -> R:
    """Parse ``argv`` with the parser ``make_parser(defaults)`` builds, then ``resolve`` the config of class
    ``cls`` it gives. With ``--config FILE`` the command line is parsed again with the file's values as the
    defaults, so that flags given override the file and the file overrides the declared defaults. A file that
    cannot be read, is not valid YAML or holds an unknown key or a wrong value, and a ConfigError from
    ``resolve``, exit through ``parser.error`` (status 2) with one line."""
    parser = make_parser({})
    namespace = parser.parse_args(argv)
    path = getattr(namespace, CONFIG_FLAG, None)
    try:
        if path is not None:
            parser = make_parser(load_recipe(cls, path))
            namespace = parser.parse_args(argv)
        return resolve(from_flat(cls, vars(namespace)))
    except ConfigError as e:
        parser.error(str(e))


def load_recipe(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """The options a recipe file sets, by flag name, checked and converted to the options' types. Raises
    ConfigError (one line naming the file, and the key where one is at fault)."""
    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{where}: cannot read the file ({reason})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at} ({problem})") from e
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of flag names to values (e.g. 'batch_size: 256'), got "
                          f"a {type(data).__name__}")
    specs = {s.name: s for s in option_specs(cls)}
    offered = sorted(n for n, s in specs.items() if s.meta.cli and n != CONFIG_FLAG)
    values = {}
    for key, value in data.items():
        spec = specs.get(key) if isinstance(key, str) else None
        if key == CONFIG_FLAG:
            raise ConfigError(f"{where}: key {key!r}: a recipe cannot name another recipe")
        if spec is None or not spec.meta.cli:
            close = difflib.get_close_matches(str(key), offered, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            why = "is not an option of this command" if spec is not None else "is not a flag name"
            raise ConfigError(f"{where}: unknown key {key!r} ({why}; {hint}keys are flag names without the "
                              f"dashes, flat, e.g. 'batch_size: 256')")
        values[key] = _coerce(spec, value, f"{where}: {key}")
    return values


def _coerce(spec: OptionSpec, value: Any, where: str) -> Any:
    if value is None:
        if spec.optional:
            return None
        raise ConfigError(f"{where}: a value is required (null is not one)")
    if isinstance(value, (Mapping, list)):
        raise ConfigError(f"{where}: a {'mapping' if isinstance(value, Mapping) else 'list'} is not a value: "
                          "recipes are flat (flag names at the top level, e.g. 'batch_size: 256')")
    kind = spec.type
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                ok = False
            else:
                ok = True
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string (quote it)"}[kind]
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if spec.meta.choices is not None and value not in spec.meta.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, spec.meta.choices))}")
    return value


# -- plain data ------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, dict[str, Any]]:
    """The config as plain data nested by concern: {"model": {"model": ..., ...}, "optim": {...}, ...}
    (JSON-able; tuples as lists). What checkpoints store."""
    return {cf.name: {f.name: _plain(getattr(getattr(config, cf.name), f.name))
                      for f in fields(getattr(config, cf.name))}
            for cf in concern_fields(type(config))}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def from_dict(cls: type, data: Mapping[str, Mapping[str, Any]]) -> Any:
    """The config ``to_dict`` gave ``data`` for; options it lacks take their defaults. Raises ValueError on
    an unknown concern or option."""
    titles = {cf.name for cf in concern_fields(cls)}
    unknown = sorted(set(data) - titles)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown section(s) {unknown}; expected {sorted(titles)}")
    flat: dict[str, Any] = {}
    for name, values in data.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"{cls.__name__}: section {name!r} must be a mapping, got {type(values).__name__}")
        own = {s.name for s in option_specs(cls) if s.concern == name}
        extra = sorted(set(values) - own)
        if extra:
            raise ValueError(f"{cls.__name__}: unknown option(s) {extra} in section {name!r}")
        flat.update(values)
    return from_flat(cls, flat)


def from_flat(cls: type, values: Mapping[str, Any]) -> Any:
    """A config from values by flag name (e.g. ``vars(namespace)``); keys that are not options are ignored,
    options missing take their defaults."""
    concerns = {}
    for cf in concern_fields(cls):
        sub = cf.default_factory
        given = {f.name: values[f.name] for f in fields(sub) if f.name in values}
        concerns[cf.name] = sub(**given)
    return cls(**concerns)


def flat_settings(source: Any) -> dict[str, Any]:
    """Values by flag name from a config, its ``to_dict`` form, or an already flat mapping."""
    data = to_dict(source) if is_dataclass(source) and not isinstance(source, type) else source
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def saved_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint was written with, flat by flag name, comparable with ``compare``: from its
    ``config`` entry (``to_dict``), or from today's format, ``args`` (the run's argparse namespace after its
    checks filled derived values in). That format kept ``None`` for the model flags left to the model's
    value (--img_size, --patch_size, --decoder_depth, --backend) and the resolved values in ``model_config``;
    those are taken from there, as the configs here fill them in. Empty if the checkpoint holds neither."""
    config = checkpoint.get("config")
    if isinstance(config, Mapping):
        return flat_settings(config)
    args = checkpoint.get("args")
    if not isinstance(args, Mapping):
        return {}
    flat = dict(args)
    model_config = checkpoint.get("model_config")
    if isinstance(model_config, Mapping):
        flat.update({key: value for key, value in model_config.items() if key in flat})
    return flat


def compare(saved: Mapping[str, Any], current: Any) -> tuple[list[str], list[str]]:
    """(refused, warned): the options whose value in ``saved`` (flat, as ``saved_settings`` gives, or nested,
    as ``to_dict`` gives) differs from ``current``'s, by policy, each as "--name old -> new". An option the
    saved settings lack (added since) is compared as its default for ``current``'s class."""
    old_flat = {**flat_settings(type(current)()), **flat_settings(saved)}
    new_flat = flat_settings(current)
    refused, warned = [], []
    for spec in option_specs(current):
        old, new = _plain(old_flat[spec.name]), new_flat[spec.name]
        if old == new or spec.meta.policy is Policy.FREE:
            continue
        change = f"--{spec.name} {old!r} -> {new!r}"
        if spec.meta.policy is Policy.WARN:
            warned.append(change)
        elif spec.meta.relax is not None and (note := spec.meta.relax(old_flat, new_flat)):
            warned.append(f"{change} ({note})")
        else:
            refused.append(change)
    return refused, warned


# -- checks shared by every command ----------------------------------------------------------------------


def check_ranges(config: Any) -> None:
    """Raise ConfigError for the first option below its declared minimum (or not finite where it must be)."""
    values = flat_settings(config)
    for spec in option_specs(config):
        value = values[spec.name]
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"--{spec.name} {value} does not fit in 64 bits: use a value below 2**63")
        if spec.meta.minimum is None or value is None:
            continue
        if spec.meta.finite and (value < spec.meta.minimum or not math.isfinite(value)):
            raise ConfigError(f"--{spec.name} must be a finite number >= {spec.meta.minimum}, got {value}")
        if value < spec.meta.minimum:
            raise ConfigError(f"--{spec.name} must be >= {spec.meta.minimum}, got {value}")


def blr_without_effect(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The ``relax`` rule of --blr: it sets the lr only when --lr is not given, so with --lr given in both runs
    another --blr changes nothing (a warning, not a refusal)."""
    if saved.get("lr") is not None and current.get("lr") is not None:
        return "no effect: --lr is given"
    return None


# -- writing a config back as a recipe ---------------------------------------------------------------------


def to_yaml(config: Any, header: str = "") -> str:
    """The config as a recipe file (flat keys, one commented block per concern) that ``--config`` reads back
    to the same config. Options fixed for the command and the recipe's own path are left out."""
    cls = type(config)
    titles = {cf.name: concern_title(cf) for cf in concern_fields(cls)}
    values = flat_settings(config)
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    current = None
    for spec in option_specs(cls):
        if not spec.meta.cli or spec.name == CONFIG_FLAG:
            continue
        if spec.concern != current:
            current = spec.concern
            lines += ["", f"# {titles[current]}"]
        lines.append(yaml.safe_dump({spec.name: _plain(values[spec.name])}, default_flow_style=False,
                                    sort_keys=False).rstrip())
    return "\n".join(lines).lstrip("\n") + "\n"


def write_run_config(config: Any, prog: str) -> Path:
    """Write the resolved ``config`` of a run to ``<run.output_dir>/config.yaml`` (rank 0, at start): a recipe
    that ``--config`` reads back to the same configuration."""
    header = (f"The resolved configuration of this run, written by {prog} at start (derived values filled in;\n"
              f"recipe read: {config.run.config or 'none'}). Repeat the run with: {prog} --config <this file>")
    return write_yaml(config, Path(config.run.output_dir) / CONFIG_FILE, header)


def write_yaml(config: Any, path: str | os.PathLike, header: str = "") -> Path:
    """Write ``to_yaml(config, header)`` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    text = to_yaml(config, header).encode("utf-8")
    replace_atomically(path, lambda f: f.write(text))  # never through a planted link (train/files.py)
    return path


__all__ = ["CONFIG_FILE", "CONFIG_FLAG", "ConfigError", "DefaultsOnceHelpFormatter", "Option", "OptionSpec", "Policy",
           "blr_without_effect", "check_ranges", "compare", "concern_fields", "concern_title", "flat_settings",
           "from_dict", "from_flat", "generate_parser", "load_recipe", "option", "option_specs", "parse_command_line",
           "recipe_option", "saved_settings", "specialise", "to_dict", "to_yaml", "write_run_config", "write_yaml"]
