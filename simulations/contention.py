"""How much a light, bursty background load slows one site's training: the mechanism behind
the federation overhead (docs/results/performance.md).

    python -m clinfed.simulations.contention [--threads 2] [--busy-ms 1.6] [--period-ms 20]
                                     [--steps 20] [--repeats 3] [--site h01] [--model minilm]

Flower's and Ray's own processes (SuperLink, ServerApp polling, heart-beats, log streaming) use a
few per cent of the CPU in short bursts. A training step split over every core waits for its
slowest thread, so each burst stalls all of them. This trains the same steps of one site of the
default federation alternately quiet and beside a process that spins `busy-ms` every `period-ms`,
and prints the medians and the slowdown with the machine and settings. Run it at 1 and at 2
threads to see the amplification.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time


def _burner(stop, period: float, busy: float):
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < busy:
            pass
        time.sleep(max(0.0, period - busy))


def measure(threads: int = 2, busy_ms: float = 1.6, period_ms: float = 20.0, steps: int = 20, repeats: int = 3,
            site: str = "h01", model: str = "minilm", data_dir: str = "") -> dict:
    """Median seconds of `steps` training steps, quiet and loaded, alternating `repeats` times."""
    from pathlib import Path

    from clinfed.simulations.app import default_federation
    from clinfed.common.model_cache import LoadedModel, model_key
    from clinfed.client.classifier_site import Site
    from clinfed.common.config import resolve
    from clinfed.common.data import find_table
    from clinfed.common.training import set_threads
    from clinfed.simulations.bench import quiet

    quiet()
    set_threads(threads)
    cfg = resolve({"model": model})
    fed = Path(data_dir) if data_dir else default_federation(cfg)
    lm = LoadedModel(model_key(cfg))
    s = Site(site, find_table(fed / site), Path(os.environ.get("TMPDIR", "/tmp")) / "clinfed-contention", cfg)
    s.train(lm, lm.init_state, min(3, steps), 0, "warm-up")
    times: dict[str, list[float]] = {"quiet": [], "loaded": []}
    for rep in range(repeats):
        for mode in ("quiet", "loaded"):
            stop, proc = mp.Event(), None
            if mode == "loaded":
                proc = mp.Process(target=_burner, args=(stop, period_ms / 1000, busy_ms / 1000), daemon=True)
                proc.start()
            t = time.perf_counter()
            s.train(lm, lm.init_state, steps, rep, mode)
            times[mode].append(time.perf_counter() - t)
            if proc is not None:
                stop.set()
                proc.join()
    quiet, loaded = statistics.median(times["quiet"]), statistics.median(times["loaded"])
    share = busy_ms / period_ms
    return {"threads": threads, "steps": steps, "site": site, "model": model, "repeats": repeats,
            "background_share_of_one_core": share, "background_share_of_machine": share / (os.cpu_count() or 1),
            "quiet_s": quiet, "loaded_s": loaded, "slowdown": loaded / quiet - 1, "runs_s": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clinfed.simulations.contention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy-ms", type=float, default=1.6)
    ap.add_argument("--period-ms", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--site", default="h01")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data", default="", help="federation folder (default: the default synthetic federation)")
    args = ap.parse_args(argv)
    from clinfed.simulations.bench import machine, print_kv, versions

    out = measure(args.threads, args.busy_ms, args.period_ms, args.steps, args.repeats, args.site, args.model,
                  args.data)
    print_kv("machine", machine())
    print_kv("versions", versions())
    print_kv("settings", {k: out[k] for k in ("model", "site", "steps", "threads", "repeats")}
             | {"background": f"{args.busy_ms} ms busy every {args.period_ms} ms"})
    print(f"\nbackground load: {out['background_share_of_one_core']:.1%} of one core "
          f"({out['background_share_of_machine']:.1%} of the machine)")
    print(f"{args.steps} training steps: quiet {out['quiet_s']:.2f} s, loaded {out['loaded_s']:.2f} s "
          f"(medians of {args.repeats}), slowdown {out['slowdown']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
