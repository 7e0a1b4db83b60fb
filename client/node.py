"""A hospital's node: check its data and policy, then run its Flower SuperNode.

A hospital's IT team should not have to learn Flower's flags. `check_site`
validates the hospital's table (the data contract, `common.data`) and its
policy file (`common.policy`) without any network; `supernode_command` builds
`flower-supernode` with TLS (the study's root certificate), node authentication
(the hospital's private key) and the node config the ClientApp reads
(`data-path`, `site`, `policy-path`, `output-path`; see `client.app`); `run_node`
starts it, streams its log, and turns Flower's exit codes into plain reasons.

The node runs a study's code only from an app bundle the hospital approved:
`run_node` puts `client.app_gate` on the SuperNode's PATH as `flwr-clientapp`
(the command Flower starts for each message) and hands it the approved
app-code hashes: the installed clinfed's and those in the policy file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from clinfed.client.app_gate import APPROVED_ENV
from clinfed.common.errors import ClinfedError
from clinfed.common.flower_processes import (
    DeployError,
    ProcessTree,
    check_node_key,
    check_root_cert,
    flower_env,
    flower_executable,
    format_address,
    parse_address,
)


class NodeError(ClinfedError, RuntimeError):
    """The node could not start or was refused; the message says what to do."""


@dataclass
class SiteCheck:
    """The verdict of `clinfed node --check`: one line per finding."""

    ok: bool
    name: str
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = (f"READY: site '{self.name}' can join a study" if self.ok
                   else f"NOT READY: site '{self.name}' cannot join a study until the problems above are fixed")
        return "\n".join([*self.lines, verdict])


def site_paths(data: str | Path, site: str | None = None, output: str | Path | None = None):
    """Absolute data path, site name and output folder, as the ClientApp derives them."""
    data = Path(data).expanduser().resolve()
    folder = data if data.is_dir() else data.parent
    name = site or folder.name or data.name
    out = Path(output).expanduser().resolve() if output else folder / "clinfed-out"
    return data, name, out


def _writable(folder: Path) -> str | None:
    """None when the node could keep its private adapters in `folder` (nothing is created), else why not."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{folder}: {probe} is a file, not a folder; give --output"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{folder}: this account cannot write there, so the site's private adapters could not be kept; give --output"
    return None


def check_site(data: str | Path, policy: str | Path, site: str | None = None,
               output: str | Path | None = None) -> SiteCheck:
    """Validate one hospital's data and policy file; never raises for bad input."""
    from clinfed.common.data import validate_path
    from clinfed.common.policy import PolicyError, load_site_policy
    from clinfed.common.privacy import site_name_problem

    data_path, name, out = site_paths(data, site, output)
    lines, ok = [], True
    problem = site_name_problem(name)  # exactly the egress guard's rule for the describe reply
    if problem:
        ok = False
        lines.append(f"site name: {name!r} cannot be sent: {problem}; give --site")
    report = validate_path(data_path)
    if report.kind == "federation":
        ok = False
        lines.append(f"data: {data_path} holds {len(report.sites)} hospital folders; a node serves one "
                     "hospital: give its own folder or table")
    else:
        ok &= report.ok
        body = [line for line in report.summary().splitlines() if line.strip()]
        lines.append("data: " + "\n  ".join(body))
    try:
        load_site_policy(policy)
        with open(Path(policy).expanduser(), "rb") as fh:
            items = tomllib.load(fh)
        sets = ", ".join(f"{k} = {json.dumps(v)}" for k, v in items.items()) or "nothing"
        lines.append(f"policy: {Path(policy).expanduser().resolve()}: OK; it sets {sets} "
                     "(for each setting, the stricter of this file and the study's run config applies)")
    except PolicyError as exc:
        ok = False
        lines.append(f"policy: {exc}")
    problem = _writable(out)
    if problem:
        ok = False
        lines.append(f"output: {problem}")
    else:
        lines.append(f"output: {out} (the site's private adapters and node log stay here)")
    return SiteCheck(ok=bool(ok), name=name, lines=lines)


def approved_app_hashes(policy: str | Path) -> dict[str, str]:
    """{app-code hash: why} of the bundles this node may run: its own clinfed's, and the policy file's list."""
    from clinfed.common.app_code import AppCodeError, installed_hash
    from clinfed.common.policy import load_site_policy

    try:
        approved = {installed_hash(): "the clinfed installed at this node"}
    except AppCodeError as err:
        raise NodeError(f"cannot hash the clinfed installed here ({err}); reinstall it (`pip install -e .`)") from None
    for digest in load_site_policy(policy).approved_app_hashes:
        approved.setdefault(digest, f"approved-app-hashes in {Path(policy).expanduser().resolve()}")
    return approved


def gate_folder(out: Path) -> Path:
    """A folder whose `flwr-clientapp` is `client.app_gate`, for the front of the SuperNode's PATH.

    `-P` keeps the working folder off `sys.path`, so the gate is the installed clinfed's.
    """
    folder = out / ".clinfed" / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    script.write_text("#!/bin/sh\n# clinfed: run a study's ClientApp only from an approved app bundle\n"
                      f'exec {shlex.quote(sys.executable)} -P -m clinfed.client.app_gate "$@"\n')
    script.chmod(0o755)
    return folder


def _toml_string(value: str) -> str:
    """A TOML string that Flower's `--node-config` parser (one quoted token) reads back exactly."""
    if '"' not in value:
        return json.dumps(value, ensure_ascii=False)
    if "'" not in value and "\n" not in value:
        return f"'{value}'"  # literal string: no escapes
    raise NodeError(f"the path {value!r} holds both kinds of quotes, which Flower's node config cannot "
                    "carry; move or rename it")


def node_config(data: Path, site: str, policy: Path, output: Path) -> str:
    """The `--node-config` string the ClientApp reads (client.app.locate_site)."""
    items = {"data-path": str(data), "site": site, "policy-path": str(policy), "output-path": str(output)}
    return " ".join(f"{k}={_toml_string(v)}" for k, v in items.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supernode_command(superlink: str, root_cert: str | Path, key: str | Path, data: str | Path,
                      policy: str | Path, site: str | None = None, output: str | Path | None = None,
                      runtime_port: int | None = None, max_wait: float | None = None) -> list[str]:
    """`flower-supernode` over TLS with node authentication, for this hospital."""
    exe = flower_executable("flower-supernode")
    if not exe:
        raise NodeError("flower-supernode is not on PATH: install clinfed (`pip install -e .`) in this "
                        "environment first")
    try:
        host, port = parse_address(superlink)
        root = check_root_cert(root_cert)
        key_path = check_node_key(key, private=True)
    except DeployError as exc:
        raise NodeError(str(exc)) from None
    data_path, name, out = site_paths(data, site, output)
    policy_path = Path(policy).expanduser().resolve()
    cmd = [exe, "--superlink", format_address(host, port), "--root-certificates", str(root),
           "--auth-supernode-private-key", str(key_path),
           # The node's own API for its ClientApp processes: local only, on a free port so that
           # several nodes (or other software on 9094) can share a host.
           "--host", "127.0.0.1", "--port", str(runtime_port or _free_port()),
           "--node-config", node_config(data_path, name, policy_path, out)]
    if max_wait:
        cmd += ["--max-wait-time", str(max_wait)]
    return cmd


_EXIT = re.compile(r"Exit Code: (\d+)")


def explain_exit(code: int, output: str, superlink: str, key: str | Path) -> str:
    """Flower's exit code and log, as one plain reason for a hospital's IT team."""
    codes = [int(c) for c in _EXIT.findall(output)]
    flwr_code = codes[-1] if codes else code
    key = Path(str(key))
    pub = next((p.name for p in (Path(f"{key}.pub"), key.with_suffix(".pub")) if p.exists()),
               key.with_suffix(".pub").name)
    if "Failed to activate SuperNode" in output:
        return (f"the SuperLink at {superlink} refused this node: its key is not enrolled in the study. Send "
                f"the public key ({pub}, never the private key) to the coordinating team and ask them to run "
                f"`clinfed enroll --key {pub} --name <site>` (Flower exit code {flwr_code})")
    if "CERTIFICATE_VERIFY_FAILED" in output or "certificate verify failed" in output:
        detail = ("the SuperLink's certificate is not for the host name you used"
                  if "hostname" in output.lower() or "IP address mismatch" in output else
                  "the SuperLink's certificate is not signed by the root certificate given")
        return (f"TLS check failed for {superlink}: {detail}. Use the ca.crt sent with the study invitation and "
                f"the host name the coordinating team gave (Flower exit code {flwr_code})")
    if flwr_code == 302:
        return f"Flower could not read the private key {key} (Flower exit code 302)"
    if flwr_code == 305:
        return (f"could not connect to the SuperLink at {superlink}: check the address, that the SuperLink "
                f"is running, and that the hospital's firewall lets this host reach it over HTTPS "
                f"(Flower exit code 305)")
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-4:])
    return f"flower-supernode stopped with exit code {flwr_code}: {tail}"


_NOISE = ("FutureWarning", "warnings.warn(", "is_gradient_checkpointing", "UserWarning",
          "uvicorn", "Uvicorn", "Waiting for application", "Application startup", "Started server process")


def run_node(superlink: str, root_cert: str | Path, key: str | Path, data: str | Path, policy: str | Path,
             site: str | None = None, output: str | Path | None = None, runtime_port: int | None = None,
             max_wait: float | None = None, echo: bool = True) -> int:
    """Check the site, then run its SuperNode until it stops; raise NodeError with a plain reason."""
    check = check_site(data, policy, site, output)
    if not check.ok:
        print(check.summary(), file=sys.stderr)
        raise NodeError(f"site '{check.name}' is not ready (see the check above); nothing was started")
    data_path, name, out = site_paths(data, site, output)
    cmd = supernode_command(superlink, root_cert, key, data, policy, site, output, runtime_port, max_wait)
    approved = approved_app_hashes(policy)
    # The study's app bundle is unpacked under FLWR_HOME: keep it with the site's outputs, not in ~/.flwr.
    env = flower_env(os.environ.get("FLWR_HOME") or out / ".flwr")
    out.mkdir(parents=True, exist_ok=True)
    env["PATH"] = f"{gate_folder(out)}{os.pathsep}{env.get('PATH', '')}"
    env[APPROVED_ENV] = json.dumps(approved)
    log_path = out / "node.log"
    if echo:
        print(f"clinfed: site '{name}' joining the study at {superlink} (log: {log_path})", flush=True)
        print("clinfed: this node runs a study's code only from an app bundle whose app-code hash is "
              + "; ".join(f"{h} ({why})" for h, why in approved.items()), flush=True)
    tail: list[str] = []
    tree = ProcessTree(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out)

    def pump():
        with open(log_path, "a") as logf:
            logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
            for line in tree.proc.stdout:
                logf.write(line)
                logf.flush()
                tail.append(line)
                del tail[:-200]
                if echo and not any(n in line for n in _NOISE):
                    sys.stdout.write(line)
                    sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # Wait for the SuperNode itself, not for its output to end: its SuperExec child may linger.
        code = tree.wait()
    finally:
        tree.stop()
        reader.join(timeout=10)
    text = "".join(tail)
    if code in (0, 1, 2, 3, -signal.SIGTERM, -signal.SIGINT) and not _EXIT.search(text):
        return 0  # stopped on purpose (Ctrl-C, SIGTERM, service stop): Flower's graceful exits
    raise NodeError(explain_exit(code, text, superlink, key))
