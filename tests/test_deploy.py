"""Deployment across real sites, on 127.0.0.1: a real SuperLink over TLS with node
authentication, three hospitals' SuperNodes started by `clinfed node`, a study
submitted by `clinfed run` (`flwr run . <connection>`), and the refusals: an
unenrolled key, a wrong root certificate, plain HTTP. Every process is started in
its own session and stopped in `finally`; FLWR_HOME is always inside tmp_path."""

import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from client.node import check_site, node_config
from common.cli import main
from server.deploy import (Connection, DeployError, ProcessTree, check_node_key, make_certs, parse_address,
                           run_status)

ROOT = Path(__file__).resolve().parent.parent
HOSPITALS = ("hospA", "hospB", "hospC")
STUDY = ('model="tiny-bert" num-server-rounds=1 local-steps=2 personalize-steps=1 min-cell-size=5 '
         'expected-sites=3 node-wait-timeout=120 subgroups=false bootstrap=20 regimes="base,global,local,personalized"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    return {**os.environ, "FLWR_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def clinfed(*args, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.cli", *args], capture_output=True, text=True,
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
    import shutil

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


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A TLS SuperLink with node auth, three enrolled hospitals and their running SuperNodes."""
    from simulations.generate import generate_federation

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
    info = {"base": base, "fed": fed, "certs": certs, "port": port, "policy": policy, "nodes": {}}
    log = open(base / "superlink.log", "w")
    trees = [ProcessTree([sys.executable, "-m", "common.cli", "superlink", "--certs", str(certs),
                          "--host", "127.0.0.1", "--port", str(port), "--state", str(base / "state.db")],
                         cwd=ROOT, env=_env(base / "superlink-home"), stdout=log, stderr=subprocess.STDOUT)]
    try:
        _wait_for_tls(port, certs / "ca.crt")
        for name in HOSPITALS:
            res = clinfed("enroll", "--certs", str(certs), "--superlink", f"127.0.0.1:{port}",
                          "--key", str(certs / "nodes" / f"{name}.pub"), "--name", name, home=base / "home")
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


def _node(fed, name, folder):
    """`clinfed node` for one hospital, as its IT team would start it."""
    base = fed["base"]
    log = open(base / f"node-{name}.log", "w")
    tree = ProcessTree([sys.executable, "-m", "common.cli", "node", "--data", str(fed["fed"] / folder),
                        "--policy", str(fed["policy"]), "--superlink", f"127.0.0.1:{fed['port']}",
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
        plain = ProcessTree(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
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


@pytest.mark.slow
def test_study_runs_across_three_enrolled_nodes_over_tls(federation):
    base, port = federation["base"], federation["port"]
    run_dir = base / "run"
    res = clinfed("run", "--superlink", f"127.0.0.1:{port}", "--root-cert", str(federation["certs"] / "ca.crt"),
                  "--out", str(run_dir), "--run-config", STUDY, "--timeout", "540",
                  home=base / "home", timeout=600)
    logs = {n: (base / f"node-{n}.log").read_text()[-2000:] for n in HOSPITALS}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:] + json.dumps(logs)[-3000:]
    assert all(tree.proc.poll() is None for tree in federation["nodes"].values()), logs  # nodes keep serving
    run_id = int(res.stdout.split(" as run ")[1].split(";")[0])
    assert f"run {run_id}: finished:completed" in res.stdout
    with Connection(f"127.0.0.1:{port}", federation["certs"] / "ca.crt") as conn:
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
        assert "SuperNode ID" in (base / "sites" / name / "node.log").read_text()
    assert not (run_dir / "sites").exists()
