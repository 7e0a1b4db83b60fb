"""The `clinfed` command: clear one-paragraph errors, exit codes, no tracebacks."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clinfed.cli.main import main
from clinfed.common.config import KEYS, ConfigError, parse_overrides, resolve

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clinfed.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_pyproject_run_config_matches_the_config_table():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(cfg) == set(KEYS)
    for key, (default, *_rest) in KEYS.items():
        assert cfg[key] == default, key


def test_overrides_parse_like_flwr_run():
    assert parse_overrides('num-server-rounds=2 model="tiny-bert" learning-rate=1e-3 report=false') == {
        "num-server-rounds": 2, "model": "tiny-bert", "learning-rate": 1e-3, "report": False}
    with pytest.raises(ConfigError, match="unknown run-config key 'num-rounds'"):
        resolve(parse_overrides("num-rounds=2"))
    with pytest.raises(ConfigError, match="outside the allowed range"):
        resolve({"num-server-rounds": 0})
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve({"local-steps": "many"})
    with pytest.raises(ConfigError, match="expected one of"):
        resolve({"precision": "fp8"})


def test_validate_accepts_a_generated_federation_and_rejects_a_bad_file(small_federation, tmp_path, capsys):
    assert main(["validate", str(small_federation)]) == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("encounter_id,note_text,readmitted_30d,discharge_date\n"
                   "a1,chf at home,1,2022-01-01\na2,copd,2,2022-01-02\n")
    assert main(["validate", str(bad)]) != 0
    out = capsys.readouterr().out
    assert "bad.csv" in out and "line 3" in out and "readmitted_30d" in out


@pytest.mark.parametrize("args,expect", [
    (["simulate", "--data", "/no/such/folder"], "/no/such/folder"),
    (["simulate", "--run-config", "num-rounds=3"], "unknown run-config key"),
    (["simulate", "--run-config", "local-steps=-1"], "local-steps"),
    (["report", "/no/such/run"], "metrics.csv"),
    (["validate", "/no/such/file.csv"], "does not exist"),
])
def test_bad_input_gives_a_clear_error_and_no_traceback(args, expect):
    res = run_cli(*args)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert expect in text, text
    assert "Traceback" not in text


def test_generate_writes_hospitals_and_truth(tmp_path):
    res = run_cli("generate", "--out", str(tmp_path / "fed"), "--hospitals", "3", "--sizes", "60,40,30")
    assert res.returncode == 0, res.stderr
    assert "h03: 30 encounters" in res.stdout and "nan" not in res.stdout
    assert (tmp_path / "fed" / "truth.json").exists()
    assert sorted(p.name for p in (tmp_path / "fed").iterdir() if p.is_dir()) == ["h01", "h02", "h03"]
    again = run_cli("generate", "--out", str(tmp_path / "fed"), "--hospitals", "3")
    assert again.returncode != 0 and "not empty" in again.stderr
