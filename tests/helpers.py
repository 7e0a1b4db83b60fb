"""Helpers shared by the tests: federations that plant what an audit looks for."""

from __future__ import annotations


def canary_federation(src, dst):
    """Copy a federation and plant a unique canary string in every note, so that an audit
    of the messages can look for text that must never leave a site."""
    import shutil

    import pandas as pd

    from clinfed.common.data import list_sites

    shutil.copytree(src, dst)
    for name, folder in list_sites(dst):
        path = folder / "encounters.csv"
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        df["note_text"] = [f"{t} CANARY{name}x{i:05d}Q" for i, t in enumerate(df["note_text"])]
        df.to_csv(path, index=False)
    return dst
