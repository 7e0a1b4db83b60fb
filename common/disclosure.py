"""Disclosure control: which counts, rates and metric cells a site may release.

Every number a site releases about its patients is decided here, from counts
alone (never from a metric's value, so the decision is the same for every
regime, arm and stage scored on the same patients). Three rules:

1. **Primary suppression.** A cell is released only if it holds at least k
   patients, k positives and k negatives (`releasable`). A cell whose labels
   are not released with it (a descriptor share, a split size) needs k patients.
2. **Complementary suppression.** A curious server subtracts: `all` minus the
   released bands of a grouping is the withheld bands' total, and exact n,
   positives and n-weighted sums such as the Brier score make that total
   readable. So the withheld bands of a grouping together must hold either
   nobody or at least k patients, k positives and k negatives (`remainder_safe`);
   `protect` withholds further bands, smallest first, until they do. Patients
   with a missing value are a band of their own.
3. **One look.** A withheld cell carries nothing but a flag, the same flag
   whatever withheld it (primary or complementary, empty or small), and every
   band of a closed grouping is always sent, present in the data or not.

Later groupings (paired differences by subgroup, calibration bins) call
`protect` like the subgroup bands do. What this does not protect against
(differencing two studies of the same table, or the whole table against its
splits) is written in docs/privacy.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Counts:
    """Patients of one cell, and its positives when the cell's labels are released with it
    (None: the cell releases no label information, e.g. a descriptor share)."""

    n: int
    pos: int | None = None

    @property
    def neg(self) -> int | None:
        return None if self.pos is None else self.n - self.pos


def counts(y, mask=None, labelled: bool = True) -> Counts:
    """Counts of the 0/1 labels `y` (restricted to `mask`)."""
    import numpy as np

    y = np.asarray(y).astype(int)
    if mask is not None:
        y = y[np.asarray(mask, dtype=bool)]
    return Counts(int(len(y)), int(y.sum()) if labelled else None)


def releasable(c: Counts, k: int) -> bool:
    """Primary rule: at least k patients, and (when labels go with the cell) k positives and k negatives."""
    if c.n < k:
        return False
    return c.pos is None or (c.pos >= k and c.n - c.pos >= k)


def total(cells: Iterable[Counts]) -> Counts:
    cells = list(cells)
    n = sum(c.n for c in cells)
    labelled = all(c.pos is not None for c in cells)
    return Counts(n, sum(c.pos for c in cells) if labelled else None)


def remainder_safe(withheld: Iterable[Counts], k: int) -> bool:
    """Complementary rule: withheld cells together hold nobody, or at least k patients
    (and k positives and k negatives when labels are released around them)."""
    t = total(withheld)
    return t.n == 0 or releasable(t, k)


def protect(bands: Mapping[str, Counts], k: int, *, whole_released: bool = True,
            keep: Iterable[str] = ()) -> set[str]:
    """The bands of one grouping that may be released.

    `bands` partitions the grouping's population (its `all` cell), the band of
    patients with a missing value included. Bands failing the primary rule are
    withheld; then, while the withheld bands together hold 1 to k-1 patients,
    positives or negatives, one more band is withheld: the smallest one that
    makes the remainder safe, else the smallest. `keep` names bands that are
    released elsewhere anyway (never chosen). When the grouping's population is
    itself withheld (`whole_released` false), every band is (a band of a
    withheld population could only be released on its own if the population
    passed the primary rule). The result may still leave an unsafe remainder
    when only `keep` bands are left to withhold: check with `remainder_safe`.
    """
    if not whole_released:
        return set()
    keep = set(keep)
    released = {b for b, c in bands.items() if releasable(c, k)}
    while True:
        withheld = [bands[b] for b in bands if b not in released]
        if remainder_safe(withheld, k):
            return released
        candidates = sorted((b for b in released if b not in keep), key=lambda b: (bands[b].n, b))
        if not candidates:
            return released
        fixes = [b for b in candidates if remainder_safe(withheld + [bands[b]], k)]
        released.discard(fixes[0] if fixes else candidates[0])


def leaks(whole: Counts, released: Mapping[str, Counts], k: int) -> list[str]:
    """What `whole` minus the released bands gives away, from a reader's side: the
    withheld remainder's patients, positives or negatives when 1 to k-1 (empty list: nothing)."""
    n = whole.n - sum(c.n for c in released.values())
    out = []
    if 0 < n < k:
        out.append(f"{n} patient(s)")
    if whole.pos is not None and all(c.pos is not None for c in released.values()) and n > 0:
        pos = whole.pos - sum(c.pos for c in released.values())
        neg = n - pos
        if pos < k:
            out.append(f"{pos} positive(s)")
        if neg < k:
            out.append(f"{neg} negative(s)")
    return out


__all__ = ["Counts", "counts", "leaks", "protect", "releasable", "remainder_safe", "total"]
