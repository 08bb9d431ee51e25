"""Command-line options made from dataclasses: each option, its help and its default are
written once, as a field with a docstring (the idea behind litgpt's CLI).

    @dataclass
    class PretrainOptions:
        context_length: int = 256
        \"\"\"Tokens per training window.\"\"\"

    add_options(parser, PretrainOptions, "pretraining data")    # --context-length N
    ...
    args = parser.parse_args(argv); resolve_defaults(args)
    options = options_from_args(PretrainOptions, args)           # PretrainOptions(...)

How a field becomes an option: `--field-name`; a bool that defaults to False is a switch, one
that defaults to True is `--no-field-name`; a `Literal[...]` gives the choices; `tuple[float,
float]` takes two numbers; `int | None` takes an int. A field's `metadata` may set "flag"
(another name), "metavar", "nargs" and "const" (for `--resume [CHECKPOINT]`), "default_note"
(words after the default in the help), or "cli": False (not an option). A command may change
a default (`defaults={"lr": 5e-5}`): that command's default, written once, in that command.

`explicit_options(args)` tells which options the user actually gave, so a value a file holds
(a model's context length, say) can stand unless a flag overrides it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import re
import textwrap
import types
import typing
from typing import Any, Literal

_EXPLICIT = "_explicit_options"


class _Default:
    """An option's default, wrapped so that after parsing a value still wrapped was not given."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (and its bases), one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _docs_with_flags(cls: type) -> dict[str, str]:
    """field_docs with every other field named in them (one with an underscore, so that prose
    is never mistaken for a name) shown as its flag: "max_steps" -> "--max-steps"."""
    flags = {f.name: _flag(f) for f in dataclasses.fields(cls) if "_" in f.name}
    if not flags:
        return dict(field_docs(cls))
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, flags)) + r")\b")
    return {
        name: pattern.sub(lambda m: flags[m.group(1)], doc) for name, doc in field_docs(cls).items()
    }


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(annotation))
        return (args[0] if len(args) == 1 else annotation), allows_none
    return annotation, False


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add an option for every field of dataclass `cls` (in a group called `title`), with the
    field's docstring as help and `defaults` replacing the dataclass's defaults."""
    hints = typing.get_type_hints(cls)
    docs = _docs_with_flags(cls)
    defaults = defaults or {}
    group = parser.add_argument_group(title) if title else parser
    for field in dataclasses.fields(cls):
        if not field.metadata.get("cli", True):
            continue
        if field.name in defaults:
            default = defaults[field.name]
        elif field.default is not dataclasses.MISSING:
            default = field.default
        else:
            default = field.default_factory()  # type: ignore[misc]
        kind, _ = _base_type(hints[field.name])
        help_text = docs.get(field.name, "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": field.name, "default": _Default(default)}
        flag = _flag(field)
        if kind is bool and "nargs" not in field.metadata:
            if default:  # the flag turns it off: "Show a bar." -> "Don't show a bar."
                flag = field.metadata.get("flag", "--no-" + field.name.replace("_", "-"))
                help_text = "Don't " + help_text[:1].lower() + help_text[1:]
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            if typing.get_origin(kind) is Literal:
                kwargs["choices"] = typing.get_args(kind)
            elif typing.get_origin(kind) is tuple:
                item_types = typing.get_args(kind)
                kwargs.update(type=item_types[0], nargs=len(item_types))
            elif kind in (int, float, str):
                kwargs["type"] = kind
            for key in ("nargs", "const", "metavar"):
                if key in field.metadata:
                    kwargs[key] = field.metadata[key]
            if default is not None and default is not False:
                note = field.metadata.get("default_note", "")
                shown = f"{_show(default)} {note}".strip()
                help_text += f" (default {shown})".replace("%", "%%")
        group.add_argument(flag, help=help_text, **kwargs)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Replace every option the user did not give by its default, and remember which were
    given (see `explicit_options`). Call once, right after parse_args."""
    given = set()
    for name, value in vars(args).items():
        if isinstance(value, _Default):
            setattr(args, name, value.value)
        elif not name.startswith("_"):
            given.add(name)
    setattr(args, _EXPLICIT, given)
    return args


def explicit_options(args: argparse.Namespace) -> set[str]:
    """The dest names of the options given on the command line."""
    return getattr(args, _EXPLICIT, set())


def options_from_args(cls: type, args: argparse.Namespace, **overrides: Any):
    """An instance of dataclass `cls` from the parsed options of `add_options(parser, cls)`
    (fields that are not options keep their defaults), with `overrides` on top."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True) and hasattr(args, f.name)
    }
    return cls(**{**values, **overrides})


def flag_of(parser: argparse.ArgumentParser, dest: str) -> str | None:
    """The option string of `parser` that sets `dest` ("batch_size" -> "--batch-size")."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return None
