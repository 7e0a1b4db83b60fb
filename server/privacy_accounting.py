"""What the server records of the sites' privacy: their effective policies, their DP accounting.

Sites report their effective policy (flags and numbers only) in `describe`, and
the epsilon of each DP-SGD training call with its running total; a site whose
budget is spent declines a round without failing it. Server-side DP on the
adapter updates (Flower's fixed-clipping wrapper) is accounted here too.
`PrivacyAccounting` is the part of a study (`server.study.Study`) that keeps it.
"""

from __future__ import annotations

from dataclasses import asdict

from flwr.app import Message

from clinfed.common import protocol
from clinfed.common.policy import Policy
from clinfed.server.messaging import say


class PrivacyAccounting:
    """The sites' policies and DP accounting (mixed into a study, which holds `run`, `sites`, `cfg`, `errors`)."""

    def _note_policy(self, site: str, released: dict):
        """Each site's effective policy, as it reported it in `describe` (flags and numbers only)."""
        pol = Policy.from_metrics(released)
        if pol is None:
            return
        if not hasattr(self, "site_policies"):
            self.site_policies = {}
        self.site_policies[site] = pol
        self.run.setdefault("site_policies", {})[site] = asdict(pol)

    def _adapter_groups(self, groups: dict[str, list[int]], phase: str) -> dict[str, list[int]]:
        """Metrics-only sites (policy allow-adapters = false) are sent no train message: they
        train their site-held regimes at home and are evaluated like every other site."""
        pols = getattr(self, "site_policies", {})
        held = {n for n in self.sites if n in {m for ns in groups.values() for m in ns}
                and pols.get(self.sites[n]) is not None and not pols[self.sites[n]].allow_adapters}
        if not held:
            return groups
        names = sorted(self.sites[n] for n in held)
        self.run.setdefault("metrics_only", {})[phase] = names
        say(f"{phase}: metrics-only site(s) {', '.join(names)} (policy allow-adapters = false) are not "
             "sent training rounds; they train at home and are evaluated")
        kept = {g: [n for n in nodes if n not in held] for g, nodes in groups.items()}
        for g in (g for g, nodes in kept.items() if not nodes):
            self.errors.append(f"{phase}: group {g} holds only metrics-only sites; its adapter stays untrained")
        return kept

    def _note_update_dp(self, phase: str, rounds: int):
        noise = float(self.cfg.get("update-dp-noise", 0.0))
        if noise <= 0:
            return
        from clinfed.common.dp import rdp_epsilon

        self.run.setdefault("update_dp", {})[phase] = {
            "noise_multiplier": noise, "clipping_norm": self.cfg.update_dp_clip, "rounds": rounds,
            "weighting": "equal (train-steps)", "delta": 1e-5,
            # site-level (one hospital's whole update), every site in every round: no sampling amplification
            "epsilon": rdp_epsilon([(noise, 1.0, rounds)], 1e-5),
        }

    def _declined(self, ok: dict[str, Message], label: str) -> tuple[dict[str, Message], dict[str, str]]:
        """Sites that answered without an update because their DP budget is spent: recorded
        with the reason, left out of the average, not counted as failures."""
        declined = {}
        for site, rep in list(ok.items()):
            m = dict(rep.content[protocol.METRICS]) if protocol.METRICS in rep.content.metric_records else {}
            if m.get("dp-budget-exhausted") and protocol.ARRAYS not in rep.content.array_records:
                declined[site] = (f"declined: DP budget exhausted (epsilon so far {float(m.get('dp-epsilon-total', 0)):.3g}"
                                  f", budget {float(m.get('dp-epsilon-budget', 0)):.3g})")
                ok.pop(site)
                self._note_dp(site, m, label)
                say(f"{label}: site {site} {declined[site]}")
        return ok, declined

    def _note_dp(self, site: str, m: dict, phase: str):
        """A site's released DP accounting: epsilon per training call and its running total."""
        if "dp-epsilon-total" not in m:
            return
        d = self.run.setdefault("dp", {}).setdefault(site, {"epsilon_total": 0.0, "by_phase": {}, "stopped": []})
        d["epsilon_total"] = max(d["epsilon_total"], float(m["dp-epsilon-total"]))
        if "dp-delta" in m:
            d["delta"] = float(m["dp-delta"])
        for key, val in m.items():
            if key.endswith("dp-epsilon"):
                d["by_phase"][f"{phase}" + (f" {key[:-len('-dp-epsilon')]}" if key != "dp-epsilon" else "")] = float(val)
            elif key.endswith("dp-budget-exhausted"):
                d["stopped"].append(f"{phase}" + (f" {key[:-len('-dp-budget-exhausted')]}"
                                                   if key != "dp-budget-exhausted" else ""))

    def _dp_round(self, ok: dict[str, Message], declined: dict[str, str], label: str) -> dict:
        out: dict = {"declined": declined} if declined else {}
        eps = {}
        for site, rep in ok.items():
            m = dict(rep.content[protocol.METRICS])
            if "dp-epsilon" in m:
                eps[site] = {"epsilon": float(m["dp-epsilon"]), "epsilon_total": float(m["dp-epsilon-total"])}
                self._note_dp(site, m, label)
        if eps:
            out["dp"] = eps
        return out

    def dp_rows(self) -> list[dict]:
        """The sites' released DP accounting as metrics.csv rows (split `train`): epsilon of
        each training call (`dp_epsilon`, note = the call) and the running total."""
        rows = []
        for site, d in sorted(dict(self.run.get("dp") or {}).items()):
            base = {"site": site, "split": "train", "subgroup": "all", "n": None, "status": "ok"}
            for call, eps in d.get("by_phase", {}).items():
                regime = next((r for r in ("local", "personalized", "similarity-weighted", "augmented", "cluster")
                               if f" {r}" in f" {call}"), "global")
                rows.append({**base, "regime": regime, "metric": "dp_epsilon", "value": float(eps), "note": call})
            rows.append({**base, "regime": "all", "metric": "dp_epsilon_total", "value": float(d["epsilon_total"]),
                         "note": f"at delta {d['delta']:.3g}" if "delta" in d else "delta withheld (small site)"})
            for call in d.get("stopped", []):
                rows.append({**base, "regime": "all", "metric": "dp_budget_exhausted", "value": 1.0, "note": call})
        return rows
