"""The `fastgpt` command and the package's top-level names."""

import subprocess
import sys

import pytest

import fastgpt
from fastgpt.cli import SUBCOMMANDS, main


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
