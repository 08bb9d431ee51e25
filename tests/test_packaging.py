"""How fastgpt installs: the wheel holds one top-level import name, `fastgpt` (the kernels are
`fastgpt.kernels`, the benchmarks `fastgpt.benchmarks`), so it installs beside anything, e.g.
Hugging Face's `kernels` package; and a source checkout imports the same names. The wheel and
the sdist carry the license text and the project's metadata."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def source_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and untracked but not ignored) copied to
    `dest`: a wheel built from there holds no stale build/ of the checkout (whose build/lib
    could carry modules deleted since) and leaves nothing in the checkout."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    for name in filter(None, listing.split("\0")):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the work tree is left out
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return next(out.glob("*.whl"))


def top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = {n.split("/")[0] for n in archive.namelist()}
    return {n.removesuffix(".py") for n in names if ".dist-info" not in n}


def test_the_wheel_installs_beside_another_kernels_package(tmp_path):
    had_build = (ROOT / "build").exists()
    source = source_copy(tmp_path / "source")
    wheel = build_wheel(source, tmp_path / "wheels")
    assert had_build or not (ROOT / "build").exists(), "the build wrote into the checkout"
    assert top_level_names(wheel) == {"fastgpt"}
    with zipfile.ZipFile(wheel) as archive:  # every module is in it (pyproject lists packages)
        shipped = set(archive.namelist())
    folders = (
        ("fastgpt", "fastgpt"),
        ("kernels", "fastgpt/kernels"),
        ("benchmarks", "fastgpt/benchmarks"),
    )
    for folder, installed in folders:
        modules = list((source / folder).rglob("*.py"))
        assert modules, folder
        for path in modules:
            name = f"{installed}/{path.relative_to(source / folder).as_posix()}"
            assert name in shipped, f"{name} is not in the wheel: add its package to pyproject"
    assert "fastgpt/benchmarks/hf_train_bench.py" in shipped
    assert "fastgpt/benchmarks/results/compile/budget.json" in shipped
    # The Apache-2.0 text, and the metadata that names it
    (license_path,) = [n for n in shipped if n.endswith(".dist-info/licenses/fastgpt/LICENSE")]
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(license_path) == (source / "fastgpt" / "LICENSE").read_bytes()
        metadata = archive.read(license_path.split("/")[0] + "/METADATA").decode()
    check_metadata(metadata)

    # A stand-in for Hugging Face's `kernels` distribution: a top-level package of that name.
    standin = tmp_path / "standin"
    (standin / "kernels").mkdir(parents=True)
    (standin / "kernels" / "__init__.py").write_text("STANDIN = True\n")
    (standin / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=77"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "kernels-standin"
        version = "1.0"
        [tool.setuptools]
        packages = ["kernels"]
    """)
    )
    standin_wheel = build_wheel(standin, tmp_path / "standin-wheels")
    target = tmp_path / "site"
    for whl in (wheel, standin_wheel):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
             str(whl)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    # -I: no PYTHONPATH, no current folder on sys.path; the target goes first by hand, and
    # the dev venv's editable finder (after the path finders) cannot answer for fastgpt.
    probe = textwrap.dedent("""
        import sys
        sys.path.insert(0, TARGET)
        import kernels, torch
        import fastgpt
        from fastgpt.kernels import layer_norm
        assert kernels.STANDIN and fastgpt.__file__.startswith(TARGET), fastgpt.__file__
        assert fastgpt.kernels.__file__.startswith(TARGET), fastgpt.kernels.__file__
        import fastgpt.benchmarks.hf_train_bench
        model = fastgpt.GPTModel(fastgpt.GPTConfig.from_name("tiny", vocab_size=97))
        assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 97)
        print("ok")
    """).replace("TARGET", repr(str(target)))
    run = subprocess.run(
        [sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def check_metadata(metadata: str) -> None:
    """The core metadata of the wheel (METADATA) or the sdist (PKG-INFO)."""
    headers = [line for line in metadata.split("\n\n")[0].splitlines() if ": " in line]
    assert (
        "License-Expression: Apache-2.0" in headers and "License-File: fastgpt/LICENSE" in headers
    )
    assert any(h.startswith("Project-URL: Book, https://") for h in headers), headers
    assert "Classifier: Programming Language :: Python :: 3 :: Only" in headers


def test_the_license_is_apache_2_and_the_sdist_carries_it(tmp_path):
    text = (ROOT / "fastgpt" / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and len(text) > 11000
    assert "END OF TERMS AND CONDITIONS" in text
    source = source_copy(tmp_path / "source")
    # -I: neither PYTHONPATH nor the copy's root on sys.path, where its kernels/ would stand
    # for any top-level `kernels` setuptools' plugins import
    build = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-I", "-c", build, str(tmp_path / "dist")], cwd=source, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    with tarfile.open(next((tmp_path / "dist").glob("*.tar.gz"))) as archive:
        (top,) = {name.split("/")[0] for name in archive.getnames()}
        assert archive.extractfile(f"{top}/fastgpt/LICENSE").read() == text.encode()
        check_metadata(archive.extractfile(f"{top}/PKG-INFO").read().decode())


def test_a_source_checkout_imports_the_same_names(tmp_path):
    """PYTHONPATH=. (the GPU machine's way): fastgpt.kernels is the checkout's kernels/."""
    probe = (
        "import fastgpt.kernels, fastgpt.benchmarks.harness as h; print(fastgpt.kernels.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert Path(run.stdout.strip()) == ROOT / "kernels" / "__init__.py"


FILES_UNDER_KERNELS = (
    "import sys; from pathlib import Path; "
    "mods = {n: Path(getattr(m, '__file__', None) or '.').resolve() for n, m in "
    "list(sys.modules.items())}; "
    f"folder = Path({str(ROOT / 'kernels')!r}); "
    "print(sorted(n for n, f in mods.items() if f.is_relative_to(folder)))"
)


@pytest.mark.parametrize(
    "first", ["transformers", "fastgpt.kernels"], ids=["hf-first", "fastgpt-first"]
)
def test_transformers_builds_gpt2_from_the_checkout_root(first):
    """Run in a checkout (pytest, `python`, PYTHONPATH=<checkout>), the kernels/ folder is found
    as top-level `kernels`, the name of Hugging Face's kernel hub, which transformers >= 5.13
    imports whenever its distribution is installed (5.25 requires it). `import kernels` must give
    Hugging Face's package there, in either import order, and no kernel file may be loaded a
    second time under a `kernels.` name (that would define every op twice)."""
    other = "fastgpt.kernels" if first == "transformers" else "transformers"
    code = (
        textwrap.dedent(f"""
        import importlib, importlib.metadata as metadata
        from pathlib import Path
        importlib.import_module({first!r}); importlib.import_module({other!r})
        import kernels, fastgpt.kernels
        from transformers import GPT2Config, GPT2LMHeadModel
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=97))
        try:
            metadata.distribution("kernels")
            ours = Path(kernels.__file__).resolve().is_relative_to(Path.cwd())
            assert not ours, kernels.__file__  # Hugging Face's, wherever it is installed
        except metadata.PackageNotFoundError:
            assert kernels.__path__ == [], kernels.__path__
        assert Path(fastgpt.kernels.__file__).resolve() == Path.cwd() / "kernels" / "__init__.py"
        assert fastgpt.kernels.attention.__module__ == "fastgpt.kernels.flash_attention"
    """)
        + FILES_UNDER_KERNELS
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = eval(run.stdout.strip().splitlines()[-1])
    assert loaded and all(name.startswith("fastgpt.kernels") for name in loaded), loaded


def test_without_hugging_faces_kernels_the_folder_is_an_empty_named_package(tmp_path):
    """No `kernels` distribution on the path (-S: no site-packages): `import kernels` from a
    checkout gives an empty package that imports no submodule and names fastgpt.kernels."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import kernels
        assert kernels.__path__ == [] and kernels.__all__ == [], kernels.__path__
        try:
            import kernels.attention
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError("kernels.attention was imported a second time")
        try:
            kernels.attention
        except AttributeError as error:
            print(error)
    """)
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "import fastgpt.kernels" in run.stdout and "'attention'" in run.stdout, run.stdout
