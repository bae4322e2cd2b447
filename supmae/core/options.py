"""Typed configurations: each command's options declared once, as the fields of a frozen dataclass.

    @configuration
    class SynthConfig(Config):
        \"\"\"Write the embedded synthetic dataset as an image folder of JPEGs.\"\"\"
        out_dir: str = option(positional=True, metavar="OUT_DIR")
        classes: int = option(10, "number of classes", at_least=2)

A field's type, default, help, choices and range are all there is to an option: `add_arguments` builds
the command line from them, `Config.merge` lays dictionaries of fields (a resumed checkpoint's, a config
file's, the typed options) over the defaults, and `__post_init__` checks every value once, however it
arrived, so a bad one is the same one-line SupmaeError naming the option and what it allows. This module
imports nothing heavy: the CLI parses and checks before torch is loaded.
"""
import argparse
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Self, TypeVar, Union, cast

from supmae.core.errors import SupmaeError

T = TypeVar("T", bound="Config")


@typing.dataclass_transform(frozen_default=True, kw_only_default=True)
def configuration(cls: type[T]) -> type[T]:
    """A configuration class: a frozen dataclass of keyword-only options. (Type checkers read `option()` and
    `section()` as defaults; `Config` checks what is required when one is built.)"""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)
_NOUNS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One option, as declared by `option()` and resolved against its field's type."""
    name: str                       # the field's name, and the key in files and checkpoints
    kind: type                      # bool, int, float or str
    optional: bool                  # None is a value (it means "decide for me")
    default: Any
    help: str = ""
    choices: Sequence | Callable[[], Sequence] | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    flag: str | None = None      # the command-line name, when not --name-with-dashes
    metavar: str | None = None
    positional: bool = False
    group: str | None = None     # the --help section
    shown: str | None = None     # the default as --help words it, when its value alone would not say
    # a path that must exist when given; or a function saying what of a value is missing (None: nothing)
    exists: bool | Callable[[str], str | None] = False
    listed: bool = False            # text holding comma-separated choices, at least one
    defines_run: bool = False       # a resumed run may not change it (it fixes the model or the data)

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def display(self) -> str:
        """How messages name it: the way it is typed."""
        if self.positional:
            return self.metavar or self.name.upper()
        return self.flag or "--" + self.name.replace("_", "-")

    def allowed(self) -> Sequence | None:
        return self.choices() if callable(self.choices) else self.choices

    def check(self, value: Any) -> Any:
        """`value` converted to the option's type (text from the command line included) and checked."""
        if value is None:
            if self.optional:
                return None
            raise SupmaeError(f"{self.display}: needs a value")
        value = self._convert(value)
        allowed = self.allowed()
        if self.listed and allowed is not None:
            unknown = [item for item in items(value) if item not in allowed]
            if unknown or not items(value):
                raise SupmaeError(f"{self.display}: {', '.join(map(repr, unknown)) or 'nothing'} given; choose from "
                                  f"{', '.join(map(str, allowed))}")
        elif allowed is not None and value not in allowed:
            raise SupmaeError(f"{self.display}: {value!r} is not one of {', '.join(map(str, allowed))}")
        bounds = [(self.at_least, "at least", lambda v, b: v >= b), (self.above, "above", lambda v, b: v > b),
                  (self.at_most, "at most", lambda v, b: v <= b), (self.below, "below", lambda v, b: v < b)]
        if not all(ok(value, bound) for bound, _, ok in bounds if bound is not None):
            words = " and ".join(f"{word} {_number(bound)}" for bound, word, _ in bounds if bound is not None)
            raise SupmaeError(f"{self.display}: must be {words}, got {_number(value)}")
        missing = self.exists(value) if callable(self.exists) else \
            ("does not exist" if self.exists and not os.path.exists(value) else None)
        if missing:
            raise SupmaeError(f"{self.display}: {value} {missing}")
        return value

    def _convert(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
        elif isinstance(value, bool):  # True is an int to Python, not to a user
            pass
        elif self.kind is str:
            if isinstance(value, str):
                return value
        elif isinstance(value, str):
            try:
                return self.kind(value)
            except ValueError:
                pass
        elif isinstance(value, int) or (self.kind is float and isinstance(value, float)):
            return self.kind(value)
        raise SupmaeError(f"{self.display}: expected {_NOUNS[self.kind]}, got {value!r}")

    def help_text(self) -> str:
        if self.required:
            default = "required"
        elif self.shown is not None:
            default = f"default: {self.shown}"
        elif self.default is None:
            default = ""
        elif self.kind is bool:
            default = f"default: {str(self.default).lower()}"
        else:
            default = f"default: {self.default}"
        text = f"{self.help} ({default})" if self.help and default else self.help or default
        return text.replace("%", "%%")  # argparse %-formats help


def items(text: str) -> list[str]:
    """The entries of a comma-separated (`listed`) option."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option(default: Any = dataclasses.MISSING, help: str = "", **spec) -> Any:
    """A configuration field: its default, what it means, and what `Option` takes besides (choices, range,
    flag, metavar, positional, group, shown, exists). No default: the option is required."""
    return dataclasses.field(default=default, metadata={"option": (help, spec)})


def section(cls: type, only: Iterable[str] | None = None, **defaults) -> Any:
    """A field holding another configuration whose options (those named in `only`, by group or by name, or
    all) are this one's too, flat on the command line and in files, with `defaults` in place of its own:
    profiling takes a run's data, hardware and model options."""
    return dataclasses.field(default_factory=lambda: cls.build(defaults),
                             metadata={"section": (cls, tuple(only) if only else None, defaults)})


def _resolve(hint) -> tuple[type, bool]:
    """(kind, optional) of a field's annotation: int, Optional[int], ..."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


class Config:
    """The base of every configuration (declared with `@configuration`): checked once, at construction."""

    # Options of which one at most is given, and a later layer giving one replaces an earlier one's choice.
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = ()

    def __post_init__(self) -> None:
        for opt in self.own_options():
            object.__setattr__(self, opt.name, opt.check(getattr(self, opt.name)))
        for names in self.EXCLUSIVE:
            given = [self.option(n).display for n in names if getattr(self, n) is not None]
            if len(given) > 1:
                raise SupmaeError(f"give {' or '.join(given)}, not both")
        self.check()

    def check(self) -> None:
        """Rules that span several options; a subclass raises SupmaeError naming them."""

    @classmethod
    def own_options(cls) -> list[Option]:
        """The options declared on this class (and its bases), sections left out."""
        cached = cls.__dict__.get("_own_options")
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = []
            for f in dataclasses.fields(cast(Any, cls)):
                if "option" not in f.metadata:
                    continue
                help, spec = f.metadata["option"]
                kind, optional = _resolve(hints[f.name])
                if kind not in _NOUNS:
                    raise TypeError(f"{cls.__name__}.{f.name}: options are bool, int, float or str, not {kind}")
                cached.append(Option(f.name, kind, optional, f.default, help, **spec))
            cls._own_options = cached
        return cached

    @classmethod
    def sections(cls) -> list[tuple[str, type, tuple[str, ...] | None, dict]]:
        """(field, configuration, the options it lends by group or name or None for all, their defaults here)."""
        return [(f.name, *f.metadata["section"]) for f in dataclasses.fields(cast(Any, cls)) if "section" in f.metadata]

    @classmethod
    def options(cls) -> list[tuple[str | None, Option]]:
        """Every option this configuration takes, with the section that holds it (None: its own)."""
        found: list[tuple[str | None, Option]] = [(None, opt) for opt in cls.own_options()]
        for name, sub, only, defaults in cls.sections():
            found += [(name, dataclasses.replace(opt, default=defaults[opt.name], shown=None)
                       if opt.name in defaults else opt)
                      for _, opt in sub.options() if only is None or opt.group in only or opt.name in only]
        return found

    @classmethod
    def run_defining(cls) -> list[str]:
        """The options that define a run: a resumed one may not change them."""
        return [opt.name for _, opt in cls.options() if opt.defines_run]

    @classmethod
    def option(cls, name: str) -> Option:
        return next(opt for _, opt in cls.options() if opt.name == name)

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Every key a file may use for an option (its name, with - or _, and its flag) -> the option's name."""
        keys = {}
        for _, opt in cls.options():
            for key in (opt.name, opt.display.lstrip("-")):
                keys[key.replace("-", "_")] = opt.name
        return keys

    @classmethod
    def fields_of(cls, table: Mapping, where: str, strict: bool = True) -> dict:
        """A file's or a checkpoint's table as option name -> value. Unknown keys are an error (`strict`) or
        left out (a checkpoint of an older version may hold options since removed)."""
        keys, fields = cls.keys(), {}
        for key, value in table.items():
            name = keys.get(str(key).replace("-", "_"))
            if name is None:
                if strict:
                    raise SupmaeError(f"{where}: unknown option {key!r}")
                continue
            fields[name] = value
        return fields

    @classmethod
    def merge(cls, *layers: Mapping[str, Any]):
        """The configuration of `layers` (option name -> value) laid in turn over the defaults: a later layer's
        value wins, and giving one of an EXCLUSIVE group in a layer clears the others' earlier values."""
        values = {}
        for layer in layers:
            for names in cls.EXCLUSIVE:
                given = [n for n in names if layer.get(n) is not None]
                if len(given) > 1:
                    raise SupmaeError(f"give {' or '.join(cls.option(n).display for n in given)}, not both")
                if given:
                    values.update({n: None for n in names})
            values.update(layer)
        return cls.build(values)

    @classmethod
    def of(cls, **values: Any) -> Self:
        """The configuration of these options (its sections' included, flat) over the defaults."""
        return cls.build(values)

    def values(self) -> dict[str, Any]:
        """Every option's value, those its sections lend included, flat by name: what files and checkpoints
        hold."""
        found = {opt.name: getattr(self, opt.name) for opt in self.own_options()}
        lent = self.options()
        for name, *_ in self.sections():
            names = {opt.name for holder, opt in lent if holder == name}
            found.update((key, value) for key, value in getattr(self, name).values().items() if key in names)
        return found

    def section_of(self, cls: type[T]) -> T:
        """The section of configuration type `cls` this one holds."""
        found = [getattr(self, name) for name, sub, *_ in self.sections() if sub is cls]
        if len(found) != 1:
            raise TypeError(f"{type(self).__name__} holds {len(found)} sections of {cls.__name__}")
        return found[0]

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> Self:
        """The configuration from option name -> value, sections filled from their options' values."""
        where = {opt.name: holder for holder, opt in cls.options()}
        own = {k: v for k, v in values.items() if where[k] is None}
        for name, sub, _, defaults in cls.sections():
            own[name] = sub.build({**defaults, **{k: v for k, v in values.items() if where[k] == name}})
        return cls(**own)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """The command-line options of configuration `cls`. Options not typed are left out of the parsed
    namespace (their default is SUPPRESS), so it holds exactly what was typed, as text."""
    groups = {}
    for _, opt in cls.options():
        target = parser
        if opt.group:
            target = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        allowed = opt.allowed() if not callable(opt.choices) else None
        metavar = opt.metavar or ("{" + ",".join(map(str, allowed)) + "}" if allowed and not opt.listed else None)
        if opt.positional:
            target.add_argument(opt.name, metavar=metavar or opt.name.upper(), help=opt.help_text())
        elif opt.kind is bool:
            target.add_argument(opt.display, dest=opt.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=opt.help_text())
        else:
            target.add_argument(opt.display, dest=opt.name, metavar=metavar, required=opt.required,
                                default=argparse.SUPPRESS, help=opt.help_text())


def from_command_line(cls: type, argv: Sequence[str] | None = None,
                      below: Callable[[dict], Sequence[Mapping]] = lambda typed: ()):
    """`cls` from a command line of its options alone (the benchmarks'), over the layers `below` gives for
    what was typed; a bad value is one line and exit status 1."""
    parser = argparse.ArgumentParser(description=inspect.cleandoc(cls.__doc__ or ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, cls)
    typed = vars(parser.parse_args(argv))
    try:
        return cls.merge(*below(typed), typed)
    except SupmaeError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
