"""The layers hold: folders import only downwards, no import circle, no private name used across modules.

`lint-imports` (import-linter) checks the contracts in pyproject.toml. It reads the
package's files from disk, so the test lays the installed `clinfed` out as a plain
tree first (an editable install maps the folders through an import hook that the
checker cannot walk).
"""

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "common", "client", "server", "simulations")


def _tree(dest: Path) -> Path:
    """The installed clinfed as a plain folder of modules (a regular package, so it is the one imported)."""
    (dest / "clinfed").mkdir(parents=True)
    (dest / "clinfed" / "__init__.py").write_text("")
    for name in PACKAGES:
        src = Path(list(importlib.util.find_spec(f"clinfed.{name}").submodule_search_locations)[0])
        shutil.copytree(src, dest / "clinfed" / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
                           " sys.exit(lint_imports_command())", "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    res = _lint(_tree(tmp_path))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("plant", ["upward", "sideways", "circle"])
def test_the_checker_fails_on_a_planted_violation(tmp_path, plant):
    tree = _tree(tmp_path)
    if plant == "upward":  # the floor importing a folder above it
        target, line = "common/metrics.py", "import clinfed.simulations.generate\n"
    elif plant == "sideways":  # the client importing the server
        target, line = "client/locate.py", "import clinfed.server.checkpoint\n"
    else:  # two modules of one folder importing each other
        target, line = "common/errors.py", "import clinfed.common.config\n"
    path = tree / "clinfed" / target
    path.write_text(line + path.read_text())
    res = _lint(tree)
    assert res.returncode != 0 and "BROKEN" in res.stdout.upper(), res.stdout[-3000:]


def test_no_private_name_is_imported_across_modules():
    """A leading underscore means "this file only": no module imports another's private name."""
    offenders = []
    for name in PACKAGES:
        folder = Path(list(importlib.util.find_spec(f"clinfed.{name}").submodule_search_locations)[0])
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clinfed"):
                    offenders += [f"{name}/{path.name}: {node.module}.{a.name}" for a in node.names
                                  if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_installing_adds_one_top_level_package(tmp_path):
    """A regular install (`pip install .`) puts exactly one package, `clinfed`, into site-packages:
    nothing generic (`common`, `server`, ...) that another distribution could overwrite."""
    import zipfile

    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    [wheel] = tmp_path.glob("clinfed-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"clinfed"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "clinfed/server/app.py" in names and "clinfed/data/pubmedqa/pqal.jsonl" in names
