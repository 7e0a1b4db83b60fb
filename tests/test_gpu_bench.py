"""`clinfed bench gpu`'s last item, the default classifier study with `--device cuda`: only in the
full form (the smoke form stays CPU-only and seconds), its mean AUCs read from the study's
metrics.csv, and a study past its time stopped and said so. The full form itself needs a GPU and
has not run (none was available)."""

import time

import pytest


def test_the_smoke_form_runs_no_study(tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import clinfed.simulations.gpu_bench as gpu_bench
    from clinfed.simulations.bench import SMOKE

    def never(*args, **kwargs):
        raise AssertionError("the smoke form started the classifier study")

    monkeypatch.setattr(gpu_bench, "classifier_study", never)
    res = gpu_bench.gpu(work=tmp_path, **SMOKE["gpu"])
    assert "classifier_study" not in res and len(res["rows"]) == 4


def test_mean_aucs_are_read_per_regime_and_split(tmp_path):
    from clinfed.simulations.gpu_bench import study_mean_aucs

    (tmp_path / "metrics.csv").write_text(
        "site,regime,split,subgroup,metric,value,n,status,note\n"
        "h01,global,test,all,auc,0.70,50,ok,\n"
        "h02,global,test,all,auc,0.60,40,ok,\n"
        "h01,global,test,all,auc_lo,0.10,50,ok,\n"
        "h01,global,test,age=18-44,auc,0.99,20,ok,\n"
        "h03,global,test,all,auc,,10,suppressed,\n"
        "h01,local,temporal,all,auc,0.55,30,ok,\n")
    assert study_mean_aucs(tmp_path) == {"global/test": 0.65, "local/temporal": 0.55}


def test_a_study_past_its_time_is_stopped_and_reported(tmp_path):
    from clinfed.simulations.gpu_bench import classifier_study

    t = time.perf_counter()
    row = classifier_study(tmp_path, device="cpu", timeout=3)
    assert row["completed"] is False and "stopped after 3s" in row["note"]
    assert time.perf_counter() - t < 90
    assert "--device cpu" in row["command"] and str(tmp_path / "classifier-study") in row["command"]
