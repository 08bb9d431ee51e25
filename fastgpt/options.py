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

How a field becomes an option: `--field-name`; a field without a default is a required
option; a bool that defaults to False is a switch, one that defaults to True is
`--no-field-name`; a `Literal[...]` gives the choices; `tuple[float, float]` takes two numbers,
`tuple[int, ...]` a comma-separated list ("64,128"); `list[str]` is repeated (`--prompt A
--prompt B`); `int | None` takes an int. A field's `metadata` may set "flag" (another name),
"metavar", "nargs" and "const" (for `--resume [CHECKPOINT]`), "positional": True (an
argument without a flag: `fastgpt classify TEXT [TEXT ...]`), "type" (a function from the
option's text to its value, in place of the annotation's; a ValueError it raises is argparse's
one-line error), "default_note" (words after the default in the help), "default_text" (shown in
place of the default's value), or "cli": False (not an option). A command may change a default
(`defaults={"lr": 5e-5}`): that command's default, written once, in that command.

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
from collections.abc import Callable
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


class _Append(argparse.Action):
    """argparse's "append" for a default wrapped in _Default: the first use starts from a copy
    of the default list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = getattr(namespace, self.dest)
        items = list(items.value if isinstance(items, _Default) else items)
        setattr(namespace, self.dest, [*items, values])


def option_type(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert` as an argparse type whose ValueError message is the one-line error (argparse
    itself would print "invalid <function name> value")."""

    @functools.wraps(convert)
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def comma_separated(convert: Callable[[str], Any]) -> Callable[[str], tuple]:
    """A field's "type" for a list in one option: "a,b,," -> (convert("a"), convert("b")),
    empty items skipped."""

    def parse(text: str) -> tuple:
        return tuple(convert(v) for v in text.split(",") if v.strip())

    return parse


def _is_list_of_values(kind: Any) -> bool:
    """tuple[X, ...]: a comma-separated option."""
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis


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


def _show(value: Any, kind: Any) -> str:
    if isinstance(value, tuple):
        return (",".join if _is_list_of_values(kind) else " ".join)(str(v) for v in value)
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
        if field.metadata.get("cli", True):
            kind, _ = _base_type(hints[field.name])
            _add_option(group, field, kind, docs.get(field.name, ""), defaults)


def _default_of(field: dataclasses.Field, defaults: dict[str, Any]) -> Any:
    """The option's default: the command's, else the field's; MISSING for a required one."""
    if field.name in defaults:
        return defaults[field.name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _add_option(group, field: dataclasses.Field, kind: Any, doc: str, defaults: dict) -> None:
    """One field's option: its flag, how its text becomes a value, its help."""
    meta = field.metadata
    help_text = doc.replace("%", "%%")
    if meta.get("positional"):  # required: a field without a default
        item = typing.get_args(kind)[0] if typing.get_origin(kind) is list else kind
        nargs = {key: meta[key] for key in ("nargs", "metavar") if key in meta}
        group.add_argument(field.name, type=item, help=help_text, **nargs)
        return
    default = _default_of(field, defaults)
    kwargs: dict[str, Any] = {"dest": field.name}
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = _Default(default)
    flag = _flag(field)
    if kind is bool and "nargs" not in meta:
        if default:  # the flag turns it off: "Show a bar." -> "Don't show a bar."
            flag = meta.get("flag", "--no-" + field.name.replace("_", "-"))
            help_text = "Don't " + help_text[:1].lower() + help_text[1:]
        kwargs["action"] = "store_false" if default else "store_true"
        group.add_argument(flag, help=help_text, **kwargs)
        return
    if "type" in meta:
        kwargs["type"] = option_type(meta["type"])
    elif typing.get_origin(kind) is Literal:
        kwargs["choices"] = typing.get_args(kind)
    elif _is_list_of_values(kind):
        kwargs["type"] = option_type(comma_separated(typing.get_args(kind)[0]))
    elif typing.get_origin(kind) is tuple:
        item_types = typing.get_args(kind)
        kwargs.update(type=item_types[0], nargs=len(item_types))
    elif typing.get_origin(kind) is list:
        kwargs.update(action=_Append, type=typing.get_args(kind)[0])
    elif kind in (int, float, str):
        kwargs["type"] = kind
    for key in ("nargs", "const", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    if _shows_default(default):
        shown = f"{meta.get('default_text') or _show(default, kind)} {meta.get('default_note', '')}"
        help_text += f" (default {shown.strip()})".replace("%", "%%")
    group.add_argument(flag, help=help_text, **kwargs)


def _shows_default(default: Any) -> bool:
    """Whether the help names the default: not for a required option, None, False or empty."""
    if default is dataclasses.MISSING or default is None or default is False:
        return False
    return not (isinstance(default, tuple | list) and not default)


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
