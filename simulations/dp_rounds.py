"""The federated DP-SGD adapter round by round: does it learn, and how fast?

    python -m clinfed.simulations.dp_rounds [--noise 0.5] [--rounds 10] [--steps 20] [--lr 0.5]
                                    [--data DIR] [--model minilm] [--threads 2]

`simulations.dp_cost` reports a study's final AUC; this prints the global adapter's mean test
AUC over the sites after every round, so the slow start of DP training is visible. It calls the
sites' real training path (`client.classifier_site.Site.train` with DP-SGD, a privacy ledger per site) and
averages their adapters as the study does (FedAvg weighted by training notes), in one process,
sites one after another, without Flower: the numbers are the study's, the messaging is not
exercised (the study and its tests do that). With `--noise -1` the rounds train without DP
(AdamW at the run config's learning rate), for comparison. Each round's line gives the epsilon of
every site so far (delta = 1/n_train).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(noise: float = 0.5, rounds: int = 10, steps: int = 20, lr: float = 0.5, data_dir: str = "",
        model: str = "minilm", threads: int = 2, out_dir: str = "", echo=print) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    from clinfed.simulations.app import default_federation
    from clinfed.common.model_cache import LoadedModel, model_key
    from clinfed.client.classifier_site import Site
    from clinfed.common.config import resolve
    from clinfed.common.data import find_table, list_sites
    from clinfed.common.dp import DPLedger, settings_for
    from clinfed.common.policy import effective
    from clinfed.common.training import predict_proba, set_threads
    from clinfed.simulations.bench import quiet

    quiet()
    set_threads(threads)
    dp_cfg = {"dp": True, "dp-noise-multiplier": noise, "dp-optimizer": "sgd", "dp-learning-rate": lr} if noise >= 0 else {}
    cfg = resolve({"model": model, "local-steps": steps, **dp_cfg})
    fed = Path(data_dir) if data_dir else default_federation(cfg)
    out = Path(out_dir or tempfile.mkdtemp(prefix="clinfed-dp-rounds-"))
    lm = LoadedModel(model_key(cfg))
    tok = lm.tokenizer
    sites = [Site(name, find_table(folder), out / name, cfg) for name, folder in list_sites(fed)]
    study = f"dp-rounds-{time.time_ns()}"
    policy = effective(cfg, None, deployment=False)  # the study's DP settings, as a site without a policy file
    dps = {s.name: settings_for(cfg, policy, len(s.splits["train"])) for s in sites}
    ledgers = {s.name: DPLedger.open(s.out_dir, study) for s in sites} if cfg.dp else {}

    def evaluate(state) -> dict[str, float]:
        net = lm.use(state)
        return {s.name: float(roc_auc_score(s.labels("test"), predict_proba(net, s.encoded("test", tok), tok.pad_token_id)))
                for s in sites if len(set(s.labels("test"))) == 2}

    base = evaluate(lm.init_state)
    rows = [{"round": 0, "mean_auc": float(np.mean(list(base.values()))), "auc": base, "epsilon": {}}]
    echo(f"untrained: mean test AUC {rows[0]['mean_auc']:.3f}")
    glob = lm.init_state
    for rnd in range(1, rounds + 1):
        updates = []
        for s in sites:
            state, _ = s.train(lm, glob, steps, seed_offset=rnd, label=f"round {rnd}", dp=dps[s.name],
                               ledger=ledgers.get(s.name))
            updates.append((state, len(s.splits["train"])))
        total = sum(n for _, n in updates)
        glob = {k: sum(st[k] * (n / total) for st, n in updates).astype(np.float32) for k in glob}
        auc = evaluate(glob)
        eps = {s.name: ledgers[s.name].epsilon(dps[s.name].delta) for s in sites} if ledgers else {}
        rows.append({"round": rnd, "mean_auc": float(np.mean(list(auc.values()))), "auc": auc, "epsilon": eps})
        echo(f"round {rnd}: mean test AUC {rows[-1]['mean_auc']:.3f}  "
             + " ".join(f"{k} {v:.2f}" for k, v in auc.items())
             + (f"  | epsilon {' '.join(f'{k} {v:.2f}' for k, v in eps.items())}" if eps else ""))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clinfed.simulations.dp_rounds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, default=0.5, help="DP-SGD noise multiplier; -1 = no DP")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="training steps per site per round")
    ap.add_argument("--lr", type=float, default=0.5, help="SGD learning rate of the DP steps")
    ap.add_argument("--data", default="", help="federation folder (default: the default synthetic federation)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from clinfed.simulations.bench import machine, print_kv

    print_kv("machine", machine())
    print_kv("settings", {"noise": args.noise, "rounds": args.rounds, "steps": args.steps, "lr": args.lr,
                          "model": args.model, "data": args.data or "default federation", "threads": args.threads,
                          "clipping": "run config dp-max-grad-norm", "batch": "run config batch-size"})
    print()
    run(args.noise, args.rounds, args.steps, args.lr, args.data, args.model, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
