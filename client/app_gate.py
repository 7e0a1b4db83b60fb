"""A hospital's node runs a study's ClientApp only from an app bundle the hospital approved.

Flower's SuperNode starts one `flwr-clientapp` process per message; that
process pulls the run's app bundle (FAB) from the node, unpacks it and imports
the ClientApp from it, bundle folder first on `sys.path`. `clinfed node` puts
this module in its place (a `flwr-clientapp` on the SuperNode's PATH, see
`client.node`), and it runs Flower's own `flwr-clientapp` with one step added
between pulling the bundle and unpacking it: the bundle's app-code hash
(`common.app_code`) must be one the node approved (`CLINFED_APPROVED_APP_HASHES`,
set by `clinfed node`: its own installed clinfed's, plus the site policy's
`approved-app-hashes`). Any other bundle is refused there, so none of its files
is written to disk or imported; Flower then sends the server an error reply
that names the hashes, and the SuperNode goes on serving.

Each process unpacks its bundle into a FLWR_HOME of its own, removed when it
ends: Flower reuses an unpacked folder whose name matches (name, version and 8
hex digits of the bundle's hash) without looking inside, so a shared folder
could serve files this check never saw.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from clinfed.common.errors import ClinfedError

APPROVED_ENV = "CLINFED_APPROVED_APP_HASHES"
# The top-level packages of clinfed itself: imported from the install to run this check,
# forgotten before Flower imports the ClientApp from the bundle.
_OWN_PACKAGES = ("clinfed",)


class AppNotApproved(ClinfedError, RuntimeError):
    """The run's app bundle is not one this hospital approved; nothing of it was unpacked or imported."""


def approved_from_env() -> dict[str, str]:
    """{hash: why approved} as `clinfed node` passed it (JSON); a missing or unreadable list approves nothing."""
    try:
        approved = json.loads(os.environ.get(APPROVED_ENV, "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(approved, dict):
        return {}
    return {str(h).strip().lower(): str(why) for h, why in approved.items()}


def check_bundle(fab: bytes, approved: dict[str, str]) -> str:
    """The bundle's app-code hash if approved; AppNotApproved naming it and the approved ones otherwise."""
    from clinfed.common.app_code import AppCodeError, bundle_hash

    try:
        digest = bundle_hash(fab)
    except AppCodeError as err:
        raise AppNotApproved(f"clinfed refused the study's app bundle: {err}; nothing of it was unpacked "
                             "or run") from None
    if digest not in approved:
        listed = "; ".join(f"{h} ({why})" for h, why in approved.items()) or "none"
        raise AppNotApproved(
            f"clinfed refused the study's app bundle: its app-code hash is {digest}, and this node runs only "
            f"{listed}. Nothing of the bundle was unpacked or run. To run it, the hospital lists its hash under "
            "approved-app-hashes in its policy file after reviewing the code (`clinfed app-hash DIR` "
            "prints the hash of an app folder), or installs that clinfed release")
    return digest


def _forget_own_modules() -> None:
    """Drop clinfed's installed modules, so the ClientApp and its imports come from the bundle, as Flower intends."""
    for name in list(sys.modules):
        if name.split(".")[0] in _OWN_PACKAGES:
            del sys.modules[name]


def main() -> None:
    """`flwr-clientapp`, with the bundle checked before Flower unpacks it."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    approved = approved_from_env()
    if "install_from_fab" not in runtime.run_clientapp.__code__.co_names:
        # Fail closed: a Flower release that unpacks bundles another way would bypass the check.
        raise SystemExit("clinfed: this Flower release unpacks app bundles in a way clinfed's check does not "
                         "cover; install the Flower version clinfed pins")
    unpack = runtime.install_from_fab

    def checked_unpack(fab_file, *args, **kwargs):
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        try:
            digest = check_bundle(content, approved)
        except AppNotApproved as err:
            print(err, file=sys.stderr, flush=True)
            raise
        print(f"clinfed: app bundle {digest} approved ({approved[digest]})", file=sys.stderr, flush=True)
        _forget_own_modules()
        return unpack(fab_file, *args, **kwargs)

    runtime.install_from_fab = checked_unpack
    base = Path(os.environ.get("FLWR_HOME") or tempfile.gettempdir()) / "clinfed-tasks"
    base.mkdir(parents=True, exist_ok=True)
    home = tempfile.mkdtemp(prefix="task-", dir=base)
    os.environ["FLWR_HOME"] = home
    try:
        flwr_clientapp()
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
