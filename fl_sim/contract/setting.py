"""How one run setting is declared, read and checked: `Setting`, `Group`, `ConfigError`, coercion by type.

A RunConfig field (fl_sim/contract/run_config.py) is a type, a default and a `Setting`. `coerce` turns a value
as a user or Flower's run config spells it into the field's type, deciding by that type alone (bool, int,
float, str, a `StrEnum`, a class with a `parse` classmethod, `X | None`), or by the parser the Setting
declares for a type that needs one (a client list, a fault table). Standard library only.
"""
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


class Name(StrEnum):
    """A name a registry outside the contract must offer exactly (tests/test_registries.py checks), so a config
    is checked without importing the registry; a wrong one is an "unknown <setting>" error."""


class Group(StrEnum):
    """Where a setting's flag is listed in a command's --help (its argparse group)."""

    DATA = "data and model"
    TRAINING = "client training (what the server configures)"
    ATTACK = "attack"
    FEDERATION = "federation"
    FAULTS = "faults and interruptions"
    SECAGG = "secure aggregation (Flower's SecAgg+, --defense secagg)"
    GENERAL = "general"  # the command's own top-level flags (--out, --seed)


T = typing.TypeVar("T")
SETTING = "setting"  # the key of a RunConfig field's metadata that holds its Setting
Parser = Callable[[object, str], object]  # (value as given, the flag) -> the field's type, or ConfigError


@dataclass(frozen=True)
class Setting:
    """What a RunConfig field declares besides its type and default: its flag, its bounds, its Flower key.

    fl_sim/commands/config.py builds each field's flag from this (`--name-with-hyphens`, argparse `type` from
    the annotation, help, group), RunConfig.check applies the bounds, and from_flower/to_flower use
    `flower_key`. `help` may say `%(default)s`: argparse fills in the default of the command that shows it
    (sweeps and `fl-sim attack` default to a different model and training than `fl-sim run`). The training
    settings' bounds are TrainingSettings' (fl_sim/contract/protocol.py): the client checks them too.
    """

    help: str
    group: Group
    least: float | None = None  # the value must be at least this (a None value of an optional field is not checked)
    above: float | None = None  # the value must be greater than this ...
    most: float | None = None  # ... and at most this
    choices: bool = False  # argparse refuses a value outside the field's enum (else RunConfig does, in one sentence)
    negatable: bool = False  # a bool flag with a --no- form too
    metavar: str | None = None
    flag_default: str | None = None  # the flag's default where the field's does not read as a flag value
    given: bool = False  # the command line has no default for it: the command names it (the field's is Flower's)
    flower_key: str | None = None  # Flower's run-config key where it is not the field's name with hyphens
    resumable: bool = False  # where and with what a run computes, not what: `fl-sim run --resume` may change it
    parse: Parser | None = None  # the field's own parser, for a type coercion cannot read alone
    # An optional count's None written as 0, since Flower's run config (TOML) has no null: what that None (and
    # so 0, on the command line as well) means. The bounds hold for every other value; the help says it.
    zero: str | None = None

    def violation(self, flag: str, value: float) -> str | None:
        """The sentence saying how `value` breaks this setting's bounds, or None when it keeps them (every
        number must be finite; a count whose setting declares `zero` may also be 0)."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        if self.least is not None and not value >= self.least:
            zero = f", or 0 for {self.zero}" if self.zero is not None else ""
            return f"{flag} must be at least {self.least}{zero}, got {value}"
        if self.above is not None and self.most is not None and not self.above < value <= self.most:
            return f"{flag} must be in ({self.above}, {self.most}], got {value}"
        if self.above == 0 and not value > 0:
            return f"{flag} must be positive, got {value}"
        if self.above is not None and not value > self.above:
            return f"{flag} must be greater than {self.above}, got {value}"
        return None

    @property
    def full_help(self) -> str:
        """The help text, with what 0 stands for where the setting declares it (0 is then the default)."""
        return self.help if self.zero is None else f"{self.help} (0, the default: {self.zero})"


def setting(default: T, declared: Setting) -> T:
    """A RunConfig field with its default and its declaration."""
    return field(default=default, metadata={SETTING: declared})


def flag_of(name: str) -> str:
    """Field `name`'s command-line flag: `--name-with-hyphens`."""
    return f"--{name.replace('_', '-')}"


def optional_of(kind: object) -> type | None:
    """X for `X | None`, else None."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return None


def coerce(kind: typing.Any, declared: Setting | None, value: object, flag: str) -> object:
    """`value` as a field of type `kind` declared by `declared`, or a ConfigError naming the flag.

    `X | None`: None and "" are None (TOML has no null), and so is 0 where the setting declares `zero`; a
    weight of 0 stays a weight."""
    parse = declared.parse if declared is not None else None
    if parse is not None:
        return parse(value, flag)
    inner = optional_of(kind)
    if inner is not None:
        if value is None or value == "" or (declared is not None and declared.zero is not None and value == 0
                                            and not isinstance(value, bool)):
            return None
        kind = inner
    return coerce_scalar(kind, value, flag)


def coerce_scalar(kind: type, value: object, flag: str) -> object:
    """`value` as `kind`: bool, int, float, str, a StrEnum (a `Name` says "unknown ..."), or a class with a
    `parse(text)` classmethod (a value of the class already is kept)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{flag} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    if isinstance(kind, type) and issubclass(kind, Name):
        if not isinstance(value, str):
            raise ConfigError(f"{flag} must be text, got {value!r}")
        if value not in set(kind):
            raise ConfigError(f"unknown {flag[2:]} {value!r}: choose one of {', '.join(kind)}")
        return kind(value)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        if isinstance(value, str) and value in set(kind):
            return kind(value)
        raise ConfigError(f"{flag} must be one of {', '.join(kind)}, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{flag} must be text, got {value!r}")
    parse = getattr(kind, "parse", None)
    if isinstance(kind, type) and callable(parse):
        if isinstance(value, kind):
            return value
        return parse(coerce_scalar(str, value, flag))
    raise TypeError(f"no coercion to {kind} for {flag}")


def to_text(value: object) -> object:
    """A field's value as Flower's run config holds it (TOML: no None, no tuples, no dicts; a parsed spec or
    an enum as its text)."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{key}={item}" for key, item in sorted(value.items()))
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and not isinstance(value, StrEnum)):
        return value
    return str(value)


def parse_client_list(value: object, flag: str) -> tuple[int, ...] | None:
    """'0,2,5' (or 0, 2, 5 as a list) -> (0, 2, 5); None, '' or 'all' -> None (every client)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "all"):
            return None
        try:
            return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
        except ValueError:
            raise ConfigError(f"{flag} must be partition ids like 0,2,5 (or all), got {text!r}") from None
    if not isinstance(value, Iterable):
        raise ConfigError(f"{flag} must be partition ids like 0,2,5 (or all), got {value!r}")
    return tuple(sorted({typing.cast(int, coerce_scalar(int, item, flag)) for item in value}))


def positive(value: float) -> bool:
    """0 < value < infinity (NaN is not)."""
    return 0 < value < math.inf
