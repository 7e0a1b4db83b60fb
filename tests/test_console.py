"""The console a person reads while a study runs, from the log Flower streams."""

import io

from clinfed.common.console import StudyConsole, progress_line

# as `flwr run --stream` delivers them (colour codes, Ray's actor prefix and dedup note included)
RAW = [
    "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
    "\x1b[92mINFO \x1b[0m:      [clinfed] 3 sites: h01 (train 101), h02 (train 83), h03 (train 65)\n",
    "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.\n",
    "\x1b[36m(ClientAppActor pid=6465)\x1b[0m \x1b[92mINFO \x1b[0m:      [clinfed] site h02 round 1: step 10/40 loss 0.699\n",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures\n",
    "\x1b[92mINFO \x1b[0m:      [clinfed] " + progress_line("global round", 1, 2, "3 sites, mean loss 0.495, 4s") + "\n",
    "\x1b[36m(ClientAppActor pid=6398)\x1b[0m \x1b[92mINFO \x1b[0m:      [clinfed] site h02 round 2: step 40/40 loss "
    "0.495\x1b[32m [repeated 20x across cluster] (Ray deduplicates logs by default.)\x1b[0m\n",
    "\x1b[92mINFO \x1b[0m:      [clinfed] " + progress_line("global round", 2, 2, "3 sites, mean loss 0.437, 3s") + "\n",
    "\x1b[91mERROR \x1b[0m:     site h03 failed: out of memory\n",
    "\x1b[92mINFO \x1b[0m:      [clinfed] " + progress_line("evaluation", 1, 1, "3 sites reported") + "\n",
]


def _render(tty: bool) -> str:
    out = io.StringIO()
    console = StudyConsole(out, tty=tty)
    for line in RAW:
        console.feed(line)
    console.close()
    return out.getvalue()


def test_piped_output_is_plain_lines_of_what_clinfed_says():
    text = _render(tty=False)
    assert text.splitlines() == [
        "3 sites: h01 (train 101), h02 (train 83), h03 (train 65)",
        "global round 1/2: 3 sites, mean loss 0.495, 4s",
        "global round 2/2: 3 sites, mean loss 0.437, 3s",
        "error: site h03 failed: out of memory",
        "evaluation 1/1: 3 sites reported",
    ]


def test_a_terminal_gets_one_bar_per_phase_without_machinery():
    text = _render(tty=True)
    for machinery in ("\x1b[9", "ClientAppActor", "repeated", "fraction_evaluate", "aggregate_train"):
        assert machinery not in text
    final = [seg.split("\r")[-1] for seg in text.split("\n") if seg.strip()]
    assert any(line.startswith("global:") and "2/2" in line for line in final), final
    assert any(line.startswith("evaluation:") and "1/1" in line for line in final), final
    assert "error: site h03 failed: out of memory" in final
