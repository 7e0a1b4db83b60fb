"""Deployment across real sites, on 127.0.0.1: a real SuperLink over TLS with node
authentication behind the study's proxy, three hospitals' SuperNodes started by
`clinfed node`, a study submitted by `clinfed run` (`flwr run . <connection>`),
and the refusals, tried as an adversary would: an unenrolled key, a wrong root
certificate, plain HTTP; an outsider holding only `ca.crt` and a key pair of its
own who tries the plain `flwr` CLI and hand-made requests against the study's
port; and a study bundle without the egress guard, which the hospitals that did
not approve it refuse before importing any of it. Every process is started in
its own session and stopped in `finally`; FLWR_HOME is always inside tmp_path.

The module's processes take about 4 minutes on 2 cores (SuperLink and nodes
about 20 s, the refused bundle about 40 s, the outsider about 15 s, the study about 130 s; under a
heavy load on the same machine, 6 minutes)."""

import io
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from clinfed.client.node import check_site, node_config
from clinfed.cli.main import main
from clinfed.common.app_code import (
    AppCodeError,
    build_bundle,
    bundle_hash,
    folder_hash,
    installed_hash,
    write_app_folder,
)
from clinfed.common.flower_processes import flower_executable, flwr_command
from clinfed.server.deploy import (CONNECTION, REFUSAL, Connection, DeployError, ProcessTree, check_node_key, list_nodes,
                           local_address, make_certs, make_node_key, parse_address, run_status, stop_run, submit,
                           wait_for_run)

ROOT = Path(__file__).resolve().parent.parent
HOSPITALS = ("hospA", "hospB", "hospC")
STUDY = ('model="tiny-bert" num-server-rounds=1 local-steps=2 personalize-steps=1 min-cell-size=5 '
         'expected-sites=3 node-wait-timeout=120 subgroups=false bootstrap=20 regimes="base,global,local,personalized"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    # Flower's SuperNode starts `flower-superexec` from PATH: put this interpreter's scripts first,
    # as clinfed's own launcher does, so a run from a venv that was never activated finds it
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def clinfed(*args, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clinfed.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(home), timeout=timeout)


def _wait_for_tls(port: int, ca: Path, timeout: float = 60) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost"):
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the SuperLink did not listen on {port} within {timeout}s")


# ----------------------------------------------------------------------------- fast checks
def test_certs_cover_the_hosts_and_node_keys_are_p384_openssh(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    res = make_certs(tmp_path / "c", ["fl.example.org", "10.1.2.3"], ["hospA", "hospB"])
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    srv.verify_directly_issued_by(ca)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "127.0.0.1", "::1"}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("hospA", "hospB"):
        key_path, pub_path = res["nodes"][name]
        key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
        pub = serialization.load_ssh_public_key(pub_path.read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert key_path.stat().st_mode & 0o077 == 0
    assert (tmp_path / "c" / "ca.key").stat().st_mode & 0o077 == 0
    with pytest.raises(DeployError, match="already exists"):
        make_certs(tmp_path / "c", ["x.org"], ["hospA"])
    with pytest.raises(DeployError, match="not allowed"):
        make_certs(tmp_path / "d", ["x.org"], ["hosp A"])
    with pytest.raises(DeployError, match="not a host name"):
        make_certs(tmp_path / "e", ["https://x.org:8000"], [])


def test_ssh_keygen_keys_are_accepted(tmp_path):
    if not shutil_which("ssh-keygen"):
        pytest.skip("ssh-keygen not installed")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(tmp_path / "k")], check=True)
    assert check_node_key(tmp_path / "k", private=True)
    assert check_node_key(tmp_path / "k.pub", private=False)
    with pytest.raises(DeployError, match="looks like the .pub"):
        check_node_key(tmp_path / "k.pub", private=True)


def shutil_which(name):

    return shutil.which(name)


def test_node_config_survives_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    odd = tmp_path / "data with spaces" / "h'01"
    text = node_config(odd, "St. Mary's", tmp_path / 'pol"icy.toml', tmp_path / "out dir")
    assert parse_config_args([text]) == {"data-path": str(odd), "site": "St. Mary's",
                                         "policy-path": str(tmp_path / 'pol"icy.toml'),
                                         "output-path": str(tmp_path / "out dir")}


def test_parse_address():
    assert parse_address("fl.example.org:9000") == ("fl.example.org", 9000)
    assert parse_address("[::1]:8001") == ("::1", 8001)
    assert parse_address("10.0.0.5") == ("10.0.0.5", 8000)
    with pytest.raises(DeployError, match="without a scheme"):
        parse_address("https://fl.example.org:9000")
    with pytest.raises(DeployError, match="port"):
        parse_address("fl.example.org:http")


def test_node_check_gives_a_verdict(small_federation, tmp_path, capsys):
    policy = tmp_path / "policy.toml"
    policy.write_text("min-cell-size = 20\nallow-adapters = true\n")
    site = small_federation / "h01"
    out = tmp_path / "out"
    assert main(["node", "--check", "--data", str(site), "--policy", str(policy), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "READY: site 'h01'" in text and "min-cell-size = 20" in text
    assert not out.exists()  # a check creates nothing

    policy.write_text("min-cel-size = 20\n")
    assert main(["node", "--check", "--data", str(site), "--policy", str(policy)]) == 1
    text = capsys.readouterr().out
    assert "NOT READY" in text and "min-cel-size" in text and "did you mean 'min-cell-size'" in text

    check = check_site(small_federation, tmp_path / "missing.toml")
    assert not check.ok
    assert any("a node serves one hospital" in line for line in check.lines)
    assert any("missing.toml" in line for line in check.lines)


def _release_copy(folder: Path, strays: dict[str, str]) -> Path:
    """The app folder of this release as another machine assembles it from its own install, plus that
    machine's stray files (run outputs, notes, caches), which differ from machine to machine."""
    write_app_folder(folder, "deployment")
    for name, text in strays.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_a_coordinator_and_a_hospital_with_the_same_release_compute_the_same_app_hash(tmp_path):
    coordinator = _release_copy(tmp_path / "coordinator" / "clinfed", {
        "runs/study1/run.json": '{"status": "completed"}', "notes.md": "# to do", "tests/test_x.py": "x = 1",
        "clinfed/client/__pycache__/app.cpython-311.pyc": "stale", ".gitignore": "runs/\n"})
    hospital = _release_copy(tmp_path / "hospital" / "clinfed", {"README.md": "our local copy", "scratch.json": "{}"})
    # What the coordinator's `clinfed run` sends (Flower's own bundle of its app folder) ...
    sent = bundle_hash(build_bundle(coordinator))
    # ... is what the hospital's node approves by default, and what `clinfed app-hash` prints on either side.
    assert sent == folder_hash(hospital) == installed_hash()
    printed = subprocess.run([sys.executable, "-m", "clinfed.cli", "app-hash"], capture_output=True, text=True,
                             cwd=tmp_path, env=_env(tmp_path / "home"), timeout=120)
    assert printed.returncode == 0 and printed.stdout.strip() == sent, printed.stderr
    printed = clinfed("app-hash", str(hospital), home=tmp_path / "home")
    assert printed.stdout.strip() == sent, printed.stderr

    # Any change to what the node would unpack changes the hash: a byte of code, one more module, public data
    # the app reads, the ClientApp reference.
    changes = {
        "clinfed/client/app.py": lambda p: p.write_text(p.read_text() + "\n"),
        "clinfed/client/extra.py": lambda p: p.write_text(""),
        "clinfed/data/pubmedqa/pqal.jsonl": lambda p: p.write_bytes(p.read_bytes()[:-1]),
        "pyproject.toml": lambda p: p.write_text(p.read_text().replace('clientapp = "clinfed.client.app:app"',
                                                                       'clientapp = "clinfed.client.locate:app"')),
    }
    seen = {sent}
    for name, change in changes.items():
        copy = _release_copy(tmp_path / name.replace("/", "_") / "clinfed", {})
        change(copy / name)
        digest = folder_hash(copy)
        assert digest not in seen, name
        seen.add(digest)
    # So does any file a hand-made bundle adds, e.g. one that would shadow a package (the bundle's folder goes
    # first on sys.path); Flower's builder would not pack it from a checkout, but a hostile SuperLink could send it.
    with zipfile.ZipFile(io.BytesIO(build_bundle(coordinator))) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries + [("torch.py", b"")]:
            z.writestr(name, data)
    assert bundle_hash(out.getvalue()) not in seen
    # Run config defaults are not code: a bundle that differs only there keeps its hash.
    copy = _release_copy(tmp_path / "config" / "clinfed", {})
    (copy / "pyproject.toml").write_text((copy / "pyproject.toml").read_text().replace("seed = 0", "seed = 7"))
    assert folder_hash(copy) == sent


def test_a_bundle_with_two_entries_under_one_name_has_no_hash(tmp_path):
    fab = build_bundle(write_app_folder(tmp_path / "app"))
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for name, data in entries + [("clinfed/client/app.py", b"import os\n")]:
            z.writestr(name, data)
    with pytest.raises(AppCodeError, match="twice"):
        bundle_hash(out.getvalue())
    with pytest.raises(AppCodeError, match="not a zip"):
        bundle_hash(b"not a bundle")


def test_the_policy_file_may_approve_other_app_hashes(tmp_path):
    from clinfed.common.policy import PolicyError, load_site_policy

    digest = installed_hash()
    path = tmp_path / "policy.toml"
    path.write_text(f'approved-app-hashes = ["{digest.upper()}"]\n')
    assert load_site_policy(path).approved_app_hashes == (digest,)
    for bad in ('"' + digest + '"', '["abc"]', f'["{digest}", 3]'):
        path.write_text(f"approved-app-hashes = {bad}\n")
        with pytest.raises(PolicyError, match="approved-app-hashes.*64 hex digits"):
            load_site_policy(path)


def test_the_coordinators_commands_need_the_superlink_of_this_host(tmp_path):
    certs = make_certs(tmp_path / "certs", ["localhost"], [])["ca"].parent
    for args in (["enroll", "--certs", str(certs), "--list"], ["run", "--certs", str(certs)]):
        res = clinfed(*args, home=tmp_path / "home")
        assert res.returncode == 1
        assert "no SuperLink runs from" in res.stderr and "clinfed superlink --certs" in res.stderr, res.stderr
    (certs / "superlink-local.json").write_text('{"address": "127.0.0.1:1", "pid": 999999999}')
    res = clinfed("enroll", "--certs", str(certs), "--list", home=tmp_path / "home")
    assert "is no longer running" in res.stderr, res.stderr


def test_the_proxy_forwards_exactly_the_fleet_api_to_loopback(tmp_path):
    from clinfed.server.deploy import fleet_paths, proxy_config

    certs = make_certs(tmp_path / "certs", ["localhost"], [])["ca"].parent
    paths = fleet_paths()
    assert {"/v1/fleet/register-node", "/v1/fleet/pull-messages", "/v1/fleet/push-messages", "/v1/fleet/get-fab",
            "/v1/fleet/pull-object", "/v1/fleet/push-object"} <= set(paths)
    # Every route the SuperNode's own client calls is forwarded.
    import flwr.supernode.fleet_http_client as fleet_client

    called = set(re.findall(r'path="(/v1/[^"]+)"', Path(fleet_client.__file__).read_text()))
    assert called and called <= set(paths)
    config = proxy_config(certs, "0.0.0.0", 8000, 41000, tmp_path / "proxy")
    assert config["admin"]["disabled"] is True
    server = config["apps"]["http"]["servers"]["fleet"]
    assert server["listen"] == ["0.0.0.0:8000"]
    forward, refuse = server["routes"]
    assert forward["match"] == [{"method": ["POST"], "expression": "{http.request.uri.path} in ["
                                 + ", ".join(f"'{p}'" for p in paths) + "]"}]
    assert [u["dial"] for u in forward["handle"][0]["upstreams"]] == ["127.0.0.1:41000"]
    assert refuse == {"handle": [{"handler": "static_response", "status_code": 403, "body": REFUSAL}]}


@pytest.mark.parametrize("args,expect", [
    (["node", "--data", "x", "--policy", "y"], "--superlink, --root-cert, --key"),
    (["enroll", "--key", "a.pub", "--name", "a"], "--root-cert"),
    (["run", "--superlink", "https://x:1", "--root-cert", "/no/ca.crt"], "without a scheme"),
    (["run", "--root-cert", "/no/ca.crt"], "/no/ca.crt does not exist"),
    (["certs", "--out", "/tmp/never-written", "--hosts", "x.org", "--hospitals", "bad name"], "not allowed"),
    (["superlink", "--certs", "/no/certs"], "clinfed certs"),
])
def test_deploy_commands_fail_in_one_paragraph(args, expect, tmp_path):
    res = clinfed(*args, home=tmp_path / "home")
    assert res.returncode != 0
    assert expect in res.stderr, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr


# ------------------------------------------------------------------- real processes
def _stop_all(trees):
    """Stop process trees side by side (each may wait a few seconds for a graceful exit)."""
    import threading

    threads = [threading.Thread(target=t.stop) for t in trees]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def tampered_app(folder: Path, marker_dir: Path) -> Path:
    """clinfed's app with the egress guard taken off the ClientApp and a line that, on import, leaves a
    marker named after the importing node's output folder: what a hostile or careless coordinator could send."""
    write_app_folder(folder, "deployment")
    app = folder / "clinfed" / "client" / "app.py"
    text = app.read_text()
    assert "client_app = ClientApp(mods=[privacy.egress_guard])" in text
    text = text.replace("client_app = ClientApp(mods=[privacy.egress_guard])", "client_app = ClientApp()")
    text = text.replace("from __future__ import annotations\n", "from __future__ import annotations\n"
                        f"import os, pathlib; pathlib.Path({str(marker_dir)!r}, "
                        "pathlib.Path(os.getcwd()).name).write_text('imported')\n", 1)
    app.write_text(text)
    return folder


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A TLS SuperLink with node auth behind its proxy, three enrolled hospitals and their running SuperNodes.

    hospC's policy file approves the tampered bundle's hash as well; hospA and hospB approve only their
    installed clinfed."""
    from clinfed.simulations.generate import generate_federation

    base = tmp_path_factory.mktemp("deploy")
    fed = base / "fed"
    generate_federation(fed, n_hospitals=3, seed=11, sizes=[130, 100, 80])
    certs = base / "certs"
    res = clinfed("certs", "--out", str(certs), "--hosts", "localhost", "--hospitals", ",".join(HOSPITALS) + ",rogue",
                  home=base / "home")
    assert res.returncode == 0, res.stderr
    port = _free_port()
    policy = base / "policy.toml"
    policy.write_text("min-cell-size = 5\n")
    markers = base / "markers"
    markers.mkdir()
    tampered = tampered_app(base / "tampered" / "clinfed", markers)
    policy_c = base / "policy-hospC.toml"
    policy_c.write_text(f'min-cell-size = 5\napproved-app-hashes = ["{folder_hash(tampered)}"]\n')
    info = {"base": base, "fed": fed, "certs": certs, "port": port, "policy": policy, "nodes": {},
            "policies": {"hospC": policy_c}, "tampered": tampered, "markers": markers}
    log = open(base / "superlink.log", "w")
    trees = [ProcessTree([sys.executable, "-m", "clinfed.cli", "superlink", "--certs", str(certs),
                          "--host", "127.0.0.1", "--port", str(port), "--state", str(base / "state.db")],
                         cwd=ROOT, env=_env(base / "superlink-home"), stdout=log, stderr=subprocess.STDOUT)]
    info["superlink"] = trees[0]
    try:
        _wait_for_tls(port, certs / "ca.crt")
        deadline = time.time() + 60
        while not (certs / "superlink-local.json").exists() and time.time() < deadline:
            time.sleep(0.3)
        for name in HOSPITALS:
            # The coordinator's command finds the SuperLink's loopback address by itself.
            res = clinfed("enroll", "--certs", str(certs), "--key", str(certs / "nodes" / f"{name}.pub"),
                          "--name", name, home=base / "home")
            assert res.returncode == 0, res.stderr
            assert f"enrolled {name}" in res.stdout
        for name, folder in zip(HOSPITALS, ("h01", "h02", "h03")):
            info["nodes"][name] = _node(info, name, folder)
            trees.append(info["nodes"][name])
        yield info
    finally:
        _stop_all(trees[::-1])
        log.close()
        for tree in info["nodes"].values():
            tree.log.close()
    assert all(tree.proc.poll() is not None for tree in trees)
    assert not (certs / "superlink-local.json").exists()


def _node(fed, name, folder):
    """`clinfed node` for one hospital, as its IT team would start it."""
    base = fed["base"]
    log = open(base / f"node-{name}.log", "w")
    tree = ProcessTree([sys.executable, "-m", "clinfed.cli", "node", "--data", str(fed["fed"] / folder),
                        "--policy", str(fed["policies"].get(name, fed["policy"])),
                        "--superlink", f"127.0.0.1:{fed['port']}",
                        "--root-cert", str(fed["certs"] / "ca.crt"),
                        "--key", str(fed["certs"] / "nodes" / f"{name}.key"), "--site", name,
                        "--output", str(base / "sites" / name)],
                       cwd=ROOT, env=_env(base / f"home-{name}"), stdout=log, stderr=subprocess.STDOUT)
    tree.log = log
    return tree


@pytest.mark.slow
def test_unenrolled_node_is_refused(federation):
    res = clinfed("node", "--data", str(federation["fed"] / "h03"), "--policy", str(federation["policy"]),
                  "--superlink", f"127.0.0.1:{federation['port']}", "--root-cert", str(federation["certs"] / "ca.crt"),
                  "--key", str(federation["certs"] / "nodes" / "rogue.key"), "--site", "rogue",
                  "--output", str(federation["base"] / "rogue"), home=federation["base"] / "home-rogue", timeout=90)
    assert res.returncode != 0
    assert "refused this node: its key is not enrolled" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    node_log = (federation["base"] / "rogue" / "node.log").read_text()
    assert "Failed to activate SuperNode" in node_log and "Exit Code: 305" in node_log


@pytest.mark.slow
def test_tls_is_required_and_checked(federation, tmp_path):
    port, certs = federation["port"], federation["certs"]
    # Plain HTTP to the SuperLink's port gets no answer.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()
    # A node that trusts another CA (or only the system's) refuses the SuperLink's certificate.
    other = make_certs(tmp_path / "other", ["localhost"], [])
    # The coordinator's commands check the SuperLink's certificate too.
    with Connection(f"127.0.0.1:{port}", other["ca"]) as conn:
        with pytest.raises(DeployError, match="TLS check of the SuperLink"):
            conn.probe()
    with Connection(f"localhost:{port}", certs / "ca.crt") as conn:
        conn.probe()
    res = clinfed("node", "--data", str(federation["fed"] / "h03"), "--policy", str(federation["policy"]),
                  "--superlink", f"127.0.0.1:{port}", "--root-cert", str(other["ca"]),
                  "--key", str(certs / "nodes" / "rogue.key"), "--output", str(tmp_path / "out"),
                  "--max-wait", "5", home=tmp_path / "home", timeout=90)
    assert res.returncode != 0
    assert "TLS check failed" in res.stderr and "not signed by the root certificate" in res.stderr, res.stderr
    # A plain-text SuperNode cannot talk to the TLS SuperLink either.
    # Its SuperExec child may outlive it, so wait for the SuperNode itself, then stop the tree.
    with open(tmp_path / "plain.log", "w") as log:
        plain = ProcessTree([flower_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                             "--port", str(_free_port()), "--max-retries", "1", "--max-wait-time", "5",
                             "--node-config", f'data-path="{federation["fed"] / "h03"}"'],
                            env=_env(tmp_path / "home-plain"), stdout=log, stderr=subprocess.STDOUT)
        try:
            code = plain.wait(timeout=90)
        finally:
            plain.stop()
    text = (tmp_path / "plain.log").read_text()
    assert code != 0
    assert "SuperNode ID" not in text
    assert "Exit Code: 305" in text, text[-2000:]


def _coordinator(federation) -> Connection:
    """The coordinator's connection, as `clinfed enroll` and `clinfed run` make it: the loopback address."""
    return Connection(local_address(federation["certs"]), federation["certs"] / "ca.crt")


def _outsider_home(federation, tmp_path) -> Path:
    """An outsider's FLWR_HOME: a connection to the study's public port trusting the public ca.crt."""
    home = tmp_path / "outsider-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "adv"\n\n[superlink.adv]\naddress = "127.0.0.1:{federation["port"]}"\n'
        f'root-certificates = "{federation["certs"] / "ca.crt"}"\n')
    return home


def _flwr_json(args, home: Path, cwd=None) -> dict:
    res = subprocess.run([*flwr_command(), *args, "--format", "json"], capture_output=True, text=True,
                         env={**_env(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}, cwd=cwd, timeout=180)
    start = res.stdout.find("{")
    assert start >= 0, res.stdout + res.stderr
    return json.loads(res.stdout[start:])


def _runs(conn: Connection) -> set[str]:
    return {r["run-id"] for r in conn._check(conn._json(conn.flwr("list", CONNECTION, "--format", "json"), "ls"),
                                             "ls").get("runs", [])}


@pytest.mark.slow
def test_an_outsider_with_the_public_cert_cannot_drive_the_study(federation, tmp_path):
    """Only ca.crt (every hospital has it) and a key pair of its own: Flower's own CLI against the study's port."""
    home = _outsider_home(federation, tmp_path)
    _, pub = make_node_key(tmp_path / "keys", "outsider")
    with _coordinator(federation) as conn:
        nodes_before, runs_before = list_nodes(conn), _runs(conn)
    assert len(nodes_before) == len(HOSPITALS)  # the coordinator's view works, from its own host

    register = _flwr_json(["supernode", "register", str(pub), "adv"], home)
    listing = _flwr_json(["ls", "adv"], home)
    run = _flwr_json(["run", str(federation["tampered"]), "adv", "--run-config", STUDY], home,
                     cwd=federation["tampered"])
    for what, answer in (("register", register), ("ls", listing), ("run", run)):
        assert answer.get("success") is False, (what, answer)
        assert "403 Forbidden" in answer.get("error-message", ""), (what, answer)
    assert "runs" not in listing and "run-id" not in run and "node-id" not in register

    with _coordinator(federation) as conn:
        assert len(list_nodes(conn)) == len(nodes_before)  # no key was enrolled
        assert _runs(conn) == runs_before  # no run was submitted
    # Not even the coordinator's own command gets through the public port, and it says where to run it.
    res = clinfed("enroll", "--certs", str(federation["certs"]), "--superlink", f"127.0.0.1:{federation['port']}",
                  "--list", home=tmp_path / "home")
    assert res.returncode == 1 and "serves only the hospitals' nodes" in res.stderr, res.stderr

    # Flower itself listens on loopback only, on another port; the study's port is the proxy's.
    import psutil

    listening = {}
    for proc in psutil.Process(federation["superlink"].proc.pid).children(recursive=True):
        try:
            listening[proc.name()] = {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet")
                                      if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    superlink = listening.get("flower-superlink") or listening.get("flower-superlin")
    assert superlink and all(ip == "127.0.0.1" for ip, _ in superlink), listening
    assert all(port != federation["port"] for _, port in superlink), listening
    assert ("127.0.0.1", federation["port"]) in listening.get("caddy", set()), listening


@pytest.mark.slow
def test_a_second_superlink_on_the_study_port_is_refused(federation, tmp_path):
    """Caddy shares a port it binds (SO_REUSEPORT): a second `clinfed superlink` there would take a share of
    the nodes' connections. It is refused before it starts anything, and the running study is untouched."""
    state = tmp_path / "state.db"
    with open(tmp_path / "log", "w") as log:
        second = ProcessTree([sys.executable, "-m", "clinfed.cli", "superlink", "--certs", str(federation["certs"]),
                              "--host", "127.0.0.1", "--port", str(federation["port"]), "--state", str(state)],
                             cwd=ROOT, env=_env(tmp_path / "home"), stdout=log, stderr=subprocess.STDOUT)
        try:
            code = second.wait(timeout=60)
        finally:
            second.stop()
    text = (tmp_path / "log").read_text()
    assert code == 1 and f"port {federation['port']} on 127.0.0.1 is already in use" in text, text[-2000:]
    assert "Starting Flower SuperLink" not in text and not state.exists()
    with _coordinator(federation) as conn:
        assert len(list_nodes(conn)) == len(HOSPITALS)


def _raw_post(port: int, target: str, ca: Path, body: bytes) -> tuple[int, bytes]:
    """One HTTPS request written byte for byte (no client library to normalize the path)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"POST {target} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Type: application/protobuf\r\n"
                        f"Accept: application/protobuf\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                        .encode() + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


CONTROL_TRICKS = [
    "/v1/control/list-runs", "/v1/runtime/get-nodes", "/v1/fleet/../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet/%2E%2E/control/list-runs", "/v1/fleet/..%2Fcontrol%2Flist-runs",
    "/v1/fleet%2F..%2Fcontrol/list-runs", "/v1/control%2Flist-runs", "/v1%2Fcontrol%2Flist-runs",
    "/%761/control/list-runs", "//v1/control/list-runs", "/v1//control/list-runs", "/v1/fleet//../control/list-runs",
    "/v1/fleet/register-node/../../control/list-runs", "/V1/CONTROL/LIST-RUNS", "/v1/Control/list-runs",
    "/v1/control/list-runs?next=/v1/fleet/get-run", "/v1/control/list-runs;/v1/fleet/get-run",
    "https://localhost/v1/control/list-runs", "/docs", "/openapi.json", "/health",
]


@pytest.mark.slow
def test_control_calls_through_the_study_port_are_refused_whatever_their_spelling(federation):
    from flwr.proto.control_pb2 import ListRunsRequest, ListRunsResponse

    ca, body = federation["certs"] / "ca.crt", ListRunsRequest().SerializeToString()
    local = int(local_address(federation["certs"]).rsplit(":", 1)[1])
    # The same bytes at the SuperLink's own loopback address are a working Control call, and so are some of the
    # spellings: what stands between them and the network is the proxy.
    for target in ("/v1/control/list-runs", "/v1/control%2Flist-runs", "https://localhost/v1/control/list-runs"):
        status, payload = _raw_post(local, target, ca, body)
        assert status == 200, (target, status)
        ListRunsResponse().ParseFromString(payload)
    refused = {t: _raw_post(federation["port"], t, ca, body) for t in CONTROL_TRICKS}
    leaked = {t: st for t, (st, payload) in refused.items() if st != 403 or payload != REFUSAL.encode()}
    assert not leaked, leaked
    # The Fleet API goes through: Flower itself answers (no node signature, so 401), not the proxy.
    status, payload = _raw_post(federation["port"], "/v1/fleet/get-run", ca, b"")
    assert status == 401 and payload != REFUSAL.encode(), (status, payload)


@pytest.mark.slow
def test_a_bundle_the_hospital_did_not_approve_is_never_imported(federation):
    """The coordinator submits clinfed without the egress guard. hospA and hospB approve only their installed
    clinfed: they refuse it before unpacking it, and no marker appears for them. hospC lists its hash in its
    policy file, so it runs it, and its marker shows the bundle's code would run wherever it is not refused."""
    tampered, installed = folder_hash(federation["tampered"]), installed_hash()
    assert tampered != installed
    with _coordinator(federation) as conn:
        run_id = submit(conn, federation["tampered"], STUDY)
        row = wait_for_run(conn, run_id, timeout=240)
        if not row.get("status", "").startswith("finished"):
            stop_run(conn, run_id)
    assert row["status"] == "finished:failed", row
    assert sorted(p.name for p in federation["markers"].iterdir()) == ["hospC"]
    logs = {n: (federation["base"] / "sites" / n / "node.log").read_text() for n in HOSPITALS}
    for name in ("hospA", "hospB"):
        assert (f"refused the study's app bundle: its app-code hash is {tampered}, and this node runs only "
                f"{installed} (the clinfed installed at this node)") in logs[name], logs[name][-3000:]
        assert f"app bundle {tampered} approved" not in logs[name]
    assert f"app bundle {tampered} approved (approved-app-hashes in {federation['policies']['hospC']})" in logs["hospC"]
    # The server learns why, in the sites' error replies: the hashes, nothing else.
    assert f"its app-code hash is {tampered}" in row.get("status-details", ""), row


@pytest.mark.slow
def test_study_runs_across_three_enrolled_nodes_over_tls(federation):
    base, port = federation["base"], federation["port"]
    run_dir = base / "run"
    res = clinfed("run", "--certs", str(federation["certs"]), "--out", str(run_dir), "--run-config", STUDY,
                  "--timeout", "540", home=base / "home", timeout=600)
    logs = {n: (base / f"node-{n}.log").read_text()[-2000:] for n in HOSPITALS}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:] + json.dumps(logs)[-3000:]
    assert all(tree.proc.poll() is None for tree in federation["nodes"].values()), logs  # nodes keep serving
    run_id = int(res.stdout.split(" as run ")[1].split(";")[0])
    assert f"run {run_id}: finished:completed" in res.stdout
    with _coordinator(federation) as conn:
        assert run_status(conn, run_id)["status"] == "finished:completed"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    df = pd.read_csv(run_dir / "metrics.csv")
    assert set(df["site"]) == set(HOSPITALS)
    assert {"base", "global", "local", "personalized"} <= set(df["regime"])
    assert (run_dir / "flwr.log").stat().st_size > 0
    # Site-held adapters stay at each hospital, under its own --output, never in RUN_DIR.
    for name in HOSPITALS:
        assert (base / "sites" / name / "adapters" / "local").is_dir(), name
        node_log = (base / "sites" / name / "node.log").read_text()
        assert "SuperNode ID" in node_log
        # Each node checked the genuine bundle: its hash is the installed clinfed's, approved by default.
        assert f"app bundle {installed_hash()} approved (the clinfed installed at this node)" in node_log, name
    assert not (run_dir / "sites").exists()
