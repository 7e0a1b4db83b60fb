"""One hash of an app's code, so a hospital can say which code its node will run.

A study's code reaches every hospital in the run's app bundle (Flower's FAB),
and Flower puts the bundle's folder first on `sys.path`: whatever is in it is
what runs, whatever the hospital installed. Flower's own bundle signatures work
only with Flower Hub, which an offline consortium does not have, so a node
compares the bundle with what its hospital approved instead (`client.app_gate`).

*App code* is every file Flower unpacks from a bundle (each one can be imported
or read by the app once it is on disk), by path and content, plus the
ServerApp/ClientApp references in its `pyproject.toml` (which objects Flower
loads). The rest of `pyproject.toml` is left out: Flower rewrites the file when
it builds the bundle, and what it holds besides the references is the run
config's defaults (any run config overrides them; a site's policy file bounds
them) and the package's dependencies (never installed at run time). Flower's
`.info/` manifest is left out too: it only repeats the files' hashes, and the
installer deletes it.

The same function hashes both sides: the bundle `flwr run` sends (built by
Flower's `build_fab_from_disk` from the app folder) and, at a hospital, the
bundle Flower would build from its own installed clinfed. Which files Flower
packs is fixed by the app folder clinfed assembles from its installed package
(`write_app_folder`: the `*.py` of the packages the app runs and the public
data's `*.jsonl`), so stray files in a checkout (run outputs, notes, tests)
change neither the bundle nor its hash, and an editable and a regular install
of one release send the same bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tomllib
import zipfile
from pathlib import Path

from clinfed.common.errors import ClinfedError

# A new scheme gets a new tag, so hashes of two schemes never compare equal.
_SCHEME = b"clinfed-app-code-v1\n"
_CONFIG = "pyproject.toml"
_MANIFEST_DIR = ".info/"
HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class AppCodeError(ClinfedError, ValueError):
    """An app folder or bundle whose code cannot be hashed; the message names it."""


def bundle_hash(fab: bytes) -> str:
    """The app-code hash of a Flower app bundle (the bytes of a .fab file)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise AppCodeError("the app bundle is not a zip archive") from None
    files: dict[str, bytes] = {}
    components = None
    with archive:
        for info in archive.infolist():
            name = info.filename
            if info.is_dir() or name.startswith(_MANIFEST_DIR):
                continue
            if name in files or (name == _CONFIG and components is not None):
                # Two entries under one name: which one lands on disk is the extractor's choice.
                raise AppCodeError(f"the app bundle holds '{name}' twice")
            data = archive.read(info)
            if name == _CONFIG:
                components = _components(data)
            else:
                files[name] = data
    if components is None:
        raise AppCodeError(f"the app bundle has no {_CONFIG}")
    digest = hashlib.sha256(_SCHEME)
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    digest.update(b"components\0" + json.dumps(components, sort_keys=True).encode())
    return digest.hexdigest()


def _components(pyproject: bytes) -> dict:
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise AppCodeError(f"the app bundle's {_CONFIG} is not valid TOML ({err})") from None
    components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components")
    if not isinstance(components, dict):
        raise AppCodeError(f"the app bundle's {_CONFIG} has no [tool.flwr.app.components]")
    return components


def build_bundle(folder: str | Path) -> bytes:
    """The bundle `flwr run FOLDER` would send: Flower's own builder, same files, same rules."""
    from flwr.cli.build import build_fab_from_disk

    folder = Path(folder)
    try:
        return build_fab_from_disk(folder)
    except (ValueError, OSError) as err:
        raise AppCodeError(f"cannot build the app bundle of {folder}: {err}") from None


def folder_hash(folder: str | Path) -> str:
    """The app-code hash of a Flower app folder, as `flwr run` would bundle it."""
    return bundle_hash(build_bundle(folder))


def path_hash(path: str | Path) -> str:
    """The app-code hash of an app folder or of a .fab file."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        return folder_hash(path)
    if path.is_file():
        return bundle_hash(path.read_bytes())
    raise AppCodeError(f"{path} does not exist (give a Flower app folder or a .fab file)")


# What each kind of app runs: the deployment app is what hospitals' nodes execute; the
# simulation app adds the synthetic-federation capabilities of `clinfed.simulations`.
APP_PACKAGES = {"deployment": ("common", "client", "server", "data"),
                "simulation": ("common", "client", "server", "data", "simulations")}
COMPONENTS = {"deployment": {"serverapp": "clinfed.server.app:app", "clientapp": "clinfed.client.app:app"},
              "simulation": {"serverapp": "clinfed.simulations.app:server_app",
                             "clientapp": "clinfed.simulations.app:app"}}
_INCLUDE = ["clinfed/**/*.py", "clinfed/data/**/*.jsonl"]


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(f"clinfed.{name}")
    if spec is None or not spec.submodule_search_locations:
        raise AppCodeError(f"clinfed.{name} is not installed here; reinstall clinfed")
    return Path(list(spec.submodule_search_locations)[0])


def write_app_folder(dest: str | Path, kind: str = "deployment") -> Path:
    """The Flower app clinfed runs, assembled from the installed package into `dest`.

    Its code sits under `clinfed/`, as installed, so the bundle imports as the package
    does (the same code whether the release was installed editable or not), and its
    `pyproject.toml` names the components and every run-config key with its default
    (Flower accepts overrides only of declared keys). A coordinator and a hospital
    with the same release therefore build the same bundle."""
    from clinfed.common.config import KEYS

    dest = Path(dest)
    shutil.rmtree(dest / "clinfed", ignore_errors=True)  # a folder reused across releases holds this one only
    for name in APP_PACKAGES[kind]:
        src = _package_dir(name)
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            wanted = path.suffix == ".py" or (name == "data" and path.suffix == ".jsonl")
            if path.is_file() and wanted and "__pycache__" not in rel.parts:
                target = dest / "clinfed" / name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
    comps = COMPONENTS[kind]
    lines = ['[build-system]', 'requires = ["setuptools"]', 'build-backend = "setuptools.build_meta"', '',
             '[project]', 'name = "clinfed"', 'version = "0.1.0"', 'dependencies = []', '',
             '[tool.flwr.app]', 'publisher = "clinfed"', f"fab-include = {json.dumps(_INCLUDE)}", '',
             '[tool.flwr.app.components]', f'serverapp = "{comps["serverapp"]}"', f'clientapp = "{comps["clientapp"]}"',
             '', '[tool.flwr.app.config]']
    lines += [f"{key} = {_toml_value(spec[0])}" for key, spec in KEYS.items()]
    (dest / _CONFIG).write_text("\n".join(lines) + "\n")
    return dest


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


def installed_hash() -> str:
    """The app-code hash of the clinfed installed here: what this machine's `clinfed run` sends."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="clinfed-app-") as tmp:
        return folder_hash(write_app_folder(tmp, "deployment"))


def check_hash(text: str, where: str) -> str:
    """A hash as a policy file or a command line gives it: 64 hex digits."""
    value = str(text).strip().lower()
    if not HASH_RE.match(value):
        raise AppCodeError(f"{where}: {text!r} is not an app-code hash (64 hex digits, as `clinfed app-hash` "
                           "prints)")
    return value


__all__ = ["APP_PACKAGES", "AppCodeError", "COMPONENTS", "HASH_RE", "build_bundle", "bundle_hash", "check_hash",
           "folder_hash", "installed_hash", "path_hash", "write_app_folder"]
