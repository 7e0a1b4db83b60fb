"""Several simulated sites on one GPU (`clinfed simulate --gpus-per-site`): the shares planned,
the refusals, and the federation config handed to Flower, checked without a GPU and without
starting Ray (the planner takes the machine's CUDA facts as arguments)."""

import pytest

from clinfed.common.memory import GPU_SHARE, gpu_share, site_budget
from clinfed.simulations.local import GpuShareError, federation_config, plan_gpus


def test_default_share_splits_the_gpus_evenly_and_is_cpu_without_one():
    assert plan_gpus(None, 6, "auto", cuda=True, gpu_count=1) == pytest.approx(1 / 6)
    assert plan_gpus(None, 4, "cuda", cuda=True, gpu_count=2) == pytest.approx(0.5)
    assert plan_gpus(None, 2, "auto", cuda=True, gpu_count=8) == 1.0  # never several GPUs per site
    assert plan_gpus(None, 6, "auto", cuda=False, gpu_count=0) == 0.0
    assert plan_gpus(None, 6, "cpu", cuda=True, gpu_count=1) == 0.0
    assert plan_gpus(0.25, 6, "auto", cuda=True, gpu_count=1) == 0.25


@pytest.mark.parametrize("g, device, cuda, says", [
    (0.5, "auto", False, "needs a CUDA GPU"),
    (0.5, "cuda", False, "needs a CUDA GPU"),
    (2.0, "auto", True, "several GPUs per site"),
    (-0.1, "auto", True, "negative"),
    (0.5, "cpu", True, "device cpu"),
    (0.0, "cuda", True, "device cuda"),
])
def test_shares_the_machine_cannot_honour_are_refused(g, device, cuda, says):
    with pytest.raises(GpuShareError, match=says):
        plan_gpus(g, 3, device, cuda=cuda, gpu_count=1 if cuda else 0)


def test_this_machine_refuses_a_gpu_share_when_torch_sees_no_cuda(monkeypatch):
    import torch

    from clinfed.simulations.local import gpu_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GpuShareError, match="needs a CUDA GPU"):
        gpu_plan({}, 3, 0.5)
    assert gpu_plan({}, 3, None) == (0.0, 0)


def test_the_cli_refuses_before_flower_starts(tmp_path, monkeypatch, capsys):
    import torch

    from clinfed.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["simulate", "--out", str(tmp_path / "run"), "--gpus-per-site", "0.5"])
    assert rc != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run" / "federation").exists()  # nothing generated, nothing started
    with pytest.raises(SystemExit):
        main(["simulate", "--gpus-per-site", "3"])  # argparse: more than one GPU per site


def test_federation_config_carries_the_gpu_share_only_when_there_is_one():
    cpu = federation_config(3, 1.0, 0.0, 0)
    assert "num-gpus" not in cpu and "num-supernodes=3" in cpu and "client-resources-num-cpus=1" in cpu
    gpu = federation_config(6, 1.0, 1 / 6, 1)
    keys = dict(kv.split("=") for kv in gpu.split())
    assert float(keys["client-resources-num-gpus"]) == pytest.approx(1 / 6, rel=1e-4)
    assert keys["init-args-num-gpus"] == "1" and keys["num-supernodes"] == "6"


def test_flower_reads_the_gpu_share_into_its_ray_backend_config():
    """The keys are the ones flwr 1.42 turns into the Ray backend's client resources."""
    from flwr.cli.run.run import _parse_federation_config_overrides
    from flwr.simulation.app import _run_simulation_settings

    class NoOptions:
        options = None

    sim = _parse_federation_config_overrides([federation_config(4, 1.0, 0.25, 1)], NoOptions())
    n, backend, config, _, _ = _run_simulation_settings(sim)
    assert n == 4 and backend == "ray"
    assert config["client_resources"]["num_gpus"] == pytest.approx(0.25)
    assert config["client_resources"]["num_cpus"] == 1 and config["init_args"]["num_gpus"] == 1


def test_a_shared_card_gives_each_site_its_share_of_memory(monkeypatch):
    card = 80 * 2**30
    monkeypatch.setenv(GPU_SHARE, "0.25")
    assert gpu_share() == 0.25 and site_budget(0.0, card) == 20 * 2**30
    assert site_budget(12.0, card) == 12 * 2**30  # a stated budget wins
    monkeypatch.setenv(GPU_SHARE, "nonsense")
    assert site_budget(0.0, card) == card
    monkeypatch.delenv(GPU_SHARE)
    assert site_budget(0.0, card) == card
