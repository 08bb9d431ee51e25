"""The `fastgpt` command and the package's top-level names."""

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
import typing

import pytest

import fastgpt
from fastgpt.cli import SUBCOMMANDS, main
from fastgpt.options import (
    add_options,
    explicit_options,
    field_docs,
    options_from_args,
    resolve_defaults,
)


def test_version_and_help_list_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastgpt {fastgpt.__version__}"

    assert main([]) == 0  # no command: the overview
    overview = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in overview


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_explains_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"fastgpt {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["pretrain", "finetune-classify", "finetune-instruct"])
def test_training_help_lists_every_preset(command, capsys):
    from fastgpt.model_config import PRESETS

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    model_help = text.split("--model PRESET|config.json")[-1].split(" --")[0]  # its help
    assert [name for name in PRESETS if name not in model_help] == [], model_help


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'pretrian'" in capsys.readouterr().err


def test_import_fastgpt_is_light_and_names_load_on_first_use():
    # `fastgpt --help` imports the package: it must not pay for torch.
    code = "import sys, fastgpt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

    from fastgpt.generation import generate
    from fastgpt.model import GPTModel

    assert fastgpt.generate is generate
    assert fastgpt.GPTModel is GPTModel
    assert set(fastgpt.__all__) >= {"GPTConfig", "GPTModel", "generate", "get_tokenizer"}
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = fastgpt.nothing


def test_library_errors_name_parameters_and_the_cli_shows_flags(capsys):
    """A UsageError or NonFiniteLossError says "{field}": "field" from the library, the
    command's flag from the CLI (exit status 2 and 1)."""
    import argparse
    import types

    from fastgpt.cli import _run
    from fastgpt.errors import MissingFileError, NonFiniteLossError

    parser = argparse.ArgumentParser(prog="fastgpt pretrain")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--grad-clip", type=float)
    parser.add_argument("--resume", action="store_true")
    args = argparse.Namespace(command="pretrain")
    for error, code, shown in [
        (NonFiniteLossError("try a lower {lr} or a smaller {grad_clip}"), 1,
         "try a lower --lr or a smaller --grad-clip"),
        (MissingFileError("no checkpoint (train once without {resume} first)"), 2,
         "no checkpoint (train once without --resume first)"),
        (MissingFileError("no {other_field}"), 2, "no other_field"),  # not a flag: its name
    ]:  # fmt: skip

        def run(args, error=error):
            raise error

        assert _run(types.SimpleNamespace(run=run), args, parser) == code
        assert f"fastgpt pretrain: error: {shown}\n" == capsys.readouterr().err


@dataclasses.dataclass
class _Options:
    """Every kind of option a field makes that the commands' own dataclasses use."""

    model: str
    """A required one."""
    prompt: list[str] = dataclasses.field(default_factory=list)
    """Repeated."""
    dims: tuple[int, ...] = (64, 128)
    """A comma-separated list."""
    only: tuple[str, ...] = ()
    """An empty default, not shown."""
    level: int = dataclasses.field(
        default=1, metadata={"type": lambda text: _level(text), "default_text": "one"}
    )
    """A value through a function of the command's."""


def _level(text: str) -> int:
    if text not in ("1", "2"):
        raise ValueError(f"unknown level {text!r}; levels: 1, 2")
    return int(text)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgpt x")
    add_options(parser, _Options)
    return resolve_defaults(parser.parse_args(argv))


def test_options_from_fields_required_repeated_lists_and_parsed(capsys):
    options = options_from_args(_Options, _parse(["--model", "m"]))
    assert options == _Options(model="m")
    assert options.prompt == [] and options.dims == (64, 128)
    args = _parse(["--model", "m", "--prompt", "a", "--prompt", "b", "--dims", "32,,16,"])
    assert options_from_args(_Options, args) == _Options("m", ["a", "b"], (32, 16))
    assert explicit_options(args) == {"model", "prompt", "dims"}
    assert _parse(["--model", "m"]).prompt == []  # the default list is not shared
    assert options_from_args(_Options, _parse(["--model", "m", "--level", "2"])).level == 2
    for argv, error in [
        ([], "the following arguments are required: --model"),
        (["--model", "m", "--dims", "32,x"], "argument --dims: invalid literal for int()"),
        (["--model", "m", "--level", "3"], "argument --level: unknown level '3'; levels: 1, 2"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _parse(argv)
        assert exit_info.value.code == 2
        assert f"fastgpt x: error: {error}" in capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="fastgpt x")
    add_options(parser, _Options)
    text = " ".join(parser.format_help().split())
    assert "--model MODEL A required one. --prompt PROMPT Repeated. --dims DIMS" in text
    assert "A comma-separated list. (default 64,128)" in text
    assert "An empty default, not shown. --level" in text and "(default one)" in text


COMMAND_OPTIONS = {  # command -> (its options dataclasses as (module, name), required values)
    "generate": (
        [("commands.generate", "GenerateOptions"), ("devices", "InferenceOptions")],
        {"model": "gpt2"},
    ),
    "selftest": (
        [("commands.selftest", "SelftestOptions"), ("commands.selftest", "CompileCheckOptions")],
        {},
    ),
    "bench": ([("commands.bench", "BenchOptions")], {}),
    "classify": (
        [("commands.classify", "ClassifyOptions"), ("devices", "InferenceOptions")],
        {"model": "runs/spam", "texts": ["a", "b"]},
    ),
    "evaluate": (
        [("commands.evaluate", "EvaluateOptions"), ("judge", "JudgeOptions")],
        {"responses": "r.json"},
    ),
    "prepare-data": (
        [
            ("commands.prepare_data", "InputOptions"),
            ("corpus.prepare", "CorpusOptions"),
            ("commands.prepare_data", "OutputOptions"),
        ],
        {"inputs": ["a.txt"], "out": "data/a"},
    ),
}


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_every_option_of_a_command_is_a_field_with_its_docstring(command):
    """Each option of these commands is a field of the command's dataclasses, its help the
    field's docstring (other fields named by their flags), and the options not given are the
    fields' defaults."""
    names, required = COMMAND_OPTIONS[command]
    classes = [getattr(importlib.import_module(f"fastgpt.{m}"), name) for m, name in names]
    parser = argparse.ArgumentParser(prog=f"fastgpt {command}")
    importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name: (cls, f) for cls in classes for f in dataclasses.fields(cls)}
    assert set(options) == set(fields)
    for name, action in options.items():
        cls, field = fields[name]
        doc = field_docs(cls)[name]
        for other in (f.name for f in dataclasses.fields(cls) if "_" in f.name):
            doc = re.sub(rf"\b{other}\b", "--" + other.replace("_", "-"), doc)
        if typing.get_type_hints(cls)[name] is bool and field.default:
            doc = "Don't " + doc[0].lower() + doc[1:]
        assert re.sub(r" \(default [^:][^)]*\)$", "", action.help) == doc
    argv = []
    for name, value in required.items():
        values = value if isinstance(value, list) else [value]
        argv += values if not options[name].option_strings else [f"--{name}", *values]
    args = resolve_defaults(parser.parse_args(argv))
    for cls in classes:
        given = {f.name: required[f.name] for f in dataclasses.fields(cls) if f.name in required}
        assert options_from_args(cls, args) == cls(**given)


def test_the_commands_options_keep_their_values_and_errors():
    def parse(command: str, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog=f"fastgpt {command}")
        importlib.import_module(SUBCOMMANDS[command][0]).add_arguments(parser)
        return resolve_defaults(parser.parse_args(argv))

    args = parse("selftest", "--arch", "sm_80", "--head-dims", "64,128", "--only", "gelu")
    assert (args.arch, args.head_dims, args.only, args.dtypes) == ((80,), (64, 128), ("gelu",), ())
    assert parse("selftest").arch == (90, 80) and parse("selftest").jobs >= 1
    args = parse("bench", "--only", "train,gelu", "--dtypes", "BF16")
    assert (args.only, args.dtypes) == (["gelu", "train"], ("bf16",))
    args = parse("generate", "--model", "m", "--no-cache", "--prompt", "a", "--prompt", "b")
    assert (args.cache, args.prompt) == (False, ["a", "b"])
