"""Flower's own processes as both sides start them, and the addresses and TLS files they take.

The coordinator (`server.deploy`: SuperLink, proxy, `flwr` commands), a hospital's
node (`client.node`: SuperNode) and a simulation (`simulations.local`: `flwr run`)
each start Flower executables: found beside this interpreter (an environment that
is not activated, as pipx runs it), offline, never installing packages at run time,
each process tree stopped as a whole.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from clinfed.common.errors import ClinfedError

DEFAULT_PORT = 8000  # flower-superlink's own default


class DeployError(ClinfedError, RuntimeError):
    """A deployment step failed; the message says what to do."""


# ------------------------------------------------------------------ certificates and keys
def flower_executable(name: str) -> str | None:
    """A Flower command (`flwr`, `flower-superlink`, ...): beside this interpreter first, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def flwr_command() -> list[str]:
    """The `flwr` command line tool, or `python -m` of its module where no executable is found."""
    exe = flower_executable("flwr")
    return [exe] if exe else [sys.executable, "-m", "flwr.cli.app"]


def check_root_cert(path: str | Path) -> Path:
    """A readable PEM certificate, or a DeployError naming the file."""
    from cryptography import x509

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise DeployError(f"root certificate {path} does not exist (it is the ca.crt the coordinating "
                          "team sends with the study invitation)")
    try:
        x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise DeployError(f"{path} is not a PEM certificate (expected the study's ca.crt)") from None
    return path


def check_node_key(path: str | Path, private: bool) -> Path:
    """An ECDSA key on a NIST curve in OpenSSH format, as Flower reads it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path).expanduser().resolve()
    kind = "private" if private else "public"
    if not path.is_file():
        raise DeployError(f"{kind} key {path} does not exist")
    data = path.read_bytes()
    try:
        if private:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = (" (this looks like the .pub file: give the private key, without .pub)"
                if private and data.startswith(b"ecdsa-") else
                " (this looks like a private key: give the .pub file)" if not private and b"PRIVATE" in data
                else "")
        raise DeployError(f"{path} is not an OpenSSH {kind} key{hint}; make one with "
                          "`clinfed certs` or `ssh-keygen -t ecdsa -b 384 -N \"\" -f KEY`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey):
        raise DeployError(f"{path} is a {type(key).__name__.lstrip('_')}, but Flower needs an ECDSA key "
                          "(`ssh-keygen -t ecdsa -b 384 -N \"\" -f KEY`)")
    return path


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT, or HOST alone) -> (host, port), without any scheme."""
    text = (text or "").strip()
    if "://" in text:
        raise DeployError(f"SuperLink address '{text}': give HOST:PORT without a scheme "
                          "(e.g. fl.example.org:8000)")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:  # bare IPv6 address
        host, port = text, ""
    else:
        host, port = text, ""
    if not host:
        raise DeployError(f"SuperLink address '{text}' has no host (expected HOST:PORT)")
    try:
        port_n = int(port) if port else default_port
        if not 0 < port_n < 65536:
            raise ValueError
    except ValueError:
        raise DeployError(f"SuperLink address '{text}': port '{port}' is not a number from 1 to 65535") from None
    return host, port_n


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def flower_env(flwr_home: str | Path | None = None) -> dict:
    """Environment for Flower processes: offline, quiet, no runtime installs, own FLWR_HOME."""
    env = {**os.environ,
           # Flower starts its other executables by name: find them beside this interpreter.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    if flwr_home:
        env["FLWR_HOME"] = str(flwr_home)
    return env


class ProcessTree:
    """A Flower process started in its own session, and everything it starts, stopped together.

    Flower's SuperExec can sit in a process group of its own and outlive its parent
    (retrying forever against a SuperNode that already exited), so descendants are
    recorded while the root lives and are all signalled by `stop`.
    """

    def __init__(self, cmd: list[str], **popen):
        import threading

        import psutil

        self.proc = subprocess.Popen(cmd, start_new_session=True, **popen)
        self._seen: dict[int, psutil.Process] = {}
        self._done = threading.Event()
        self._watch = threading.Thread(target=self._track, daemon=True)
        self._watch.start()

    def _track(self):
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            while not self._done.is_set() and self.proc.poll() is None:
                for child in root.children(recursive=True):
                    self._seen.setdefault(child.pid, child)
                self._done.wait(0.5)
        except psutil.Error:
            pass

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the root process; a SIGTERM to us (e.g. `systemctl stop`) stops the whole tree."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self.proc.wait(timeout)
        # Only signal from the handler: the interrupted wait() holds Popen's waitpid lock, so a
        # handler that waited for the exit would never see it.
        previous = signal.signal(signal.SIGTERM, lambda *_: self._signal(signal.SIGTERM))
        try:
            return self.proc.wait(timeout)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _procs(self) -> list:
        import psutil

        procs = list(self._seen.values())
        try:
            procs += psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        return procs

    @staticmethod
    def _living(procs) -> list:
        """Processes still running; a zombie has exited (its reaper, maybe a container's init, is not ours)."""
        import psutil

        out = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # is_running: pid + start time
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def _signal(self, sig) -> None:
        import psutil

        try:
            os.killpg(self.proc.pid, sig)  # the group outlives its leader while members remain
        except (ProcessLookupError, PermissionError):
            pass
        for p in self._living(self._procs()):
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the whole tree, SIGKILL to whatever is left after `grace` seconds."""
        import signal

        self._done.set()
        procs = self._procs()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            self._signal(sig)
            deadline = time.time() + grace
            while time.time() < deadline:
                if self.proc.poll() is not None and not self._living(procs):
                    return
                time.sleep(0.1)
        self.proc.poll()


# ------------------------------------------------------------------ the study's public port
