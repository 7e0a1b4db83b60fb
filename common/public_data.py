"""Public biomedical text shipped in the repo's `data/`: PubMedQA PQA-L and MeQSum.

The product reads only the compact JSONL files in `data/` (no network at run
time). `convert_from` rebuilds them from the upstream files (the project's
shared data folder) so the conversion is reproducible; it needs `openpyxl` for
MeQSum's XLSX, which the product itself never opens.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# task name -> JSONL file under DATA_DIR
FILES = {
    "pubmedqa": Path("pubmedqa") / "pqal.jsonl",
    "meqsum": Path("meqsum") / "meqsum.jsonl",
}
SPLITS = ("train", "test")

# PubMedQA contexts are cut so pqal.jsonl stays under 1 MB (Flower bundles cap files
# at 1 MB): 70 words, of which the last 50 (the abstract's results, which carry the
# evidence for the decision) and the first 20 (its aim).
PUBMEDQA_CONTEXT_WORDS = 70
PUBMEDQA_CONTEXT_TAIL = 50
MEQSUM_TEST_ROWS = 200
MAX_FILE_BYTES = 1_000_000

MEQSUM_LICENSE = """\
MeQSum is released under the Creative Commons Attribution 4.0 International
License (CC BY 4.0): https://creativecommons.org/licenses/by/4.0/

Attribution: Asma Ben Abacha and Dina Demner-Fushman. "On the Summarization of
Consumer Health Questions." In Proceedings of the 57th Annual Meeting of the
Association for Computational Linguistics (ACL 2019), Florence, Italy.
https://www.aclweb.org/anthology/P19-1215

Changes made by clinfed: the XLSX was converted to JSONL (meqsum.jsonl) with
fields id (upstream file name without extension), question (CHQ), summary
(Summary) and a deterministic split (last 200 rows "test", the rest "train").
"""


def load_public(task: str, split: str | None = "train", limit: int | None = None,
                data_dir: Path | str | None = None) -> list[dict]:
    """Records of a public task from the repo's `data/`, in file order.

    `split` is "train", "test" or None (all). Records follow the schemas in
    `common.tasks` (plus `split`, and `long_answer` for PubMedQA).
    """
    if task not in FILES:
        raise ValueError(f"no public data for task {task!r}; available: {', '.join(FILES)}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    path = Path(data_dir or DATA_DIR) / FILES[task]
    if not path.is_file():
        raise FileNotFoundError(
            f"public data file {path} is missing: clinfed reads {task} from the repository's "
            "data/ folder, which a wheel install does not include; run from a source checkout "
            "(pip install -e .) or rebuild it with common.public_data.convert_from(SHARED_DATA_DIR, DATA_DIR)"
        )
    out: list[dict] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            record = json.loads(line)
            if split is None or record["split"] == split:
                out.append(record)
                if limit is not None and len(out) >= limit:
                    break
    return out


def _cut(text: str, max_words: int, tail: int) -> str:
    from clinfed.common.tasks import truncate_words

    return truncate_words(text, max_words, tail=tail)


def _write_jsonl(path: Path, records: list[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
    size = path.stat().st_size
    if size >= MAX_FILE_BYTES:
        raise ValueError(f"{path} is {size} bytes; keep public data files under {MAX_FILE_BYTES}")
    return size


def convert_pubmedqa(src: Path, out: Path, context_words: int = PUBMEDQA_CONTEXT_WORDS,
                     context_tail: int = PUBMEDQA_CONTEXT_TAIL) -> int:
    """ori_pqal.json -> pqal.jsonl; split "test" for the 500 ids of test_ground_truth.json."""
    items = json.loads((src / "ori_pqal.json").read_text(encoding="utf-8"))
    test_ids = set(json.loads((src / "test_ground_truth.json").read_text(encoding="utf-8")))
    records = [
        {
            "id": str(pmid),
            "question": " ".join(item["QUESTION"].split()),
            "context": _cut(" ".join(item["CONTEXTS"]), context_words, context_tail),
            "long_answer": " ".join(item["LONG_ANSWER"].split()),
            "decision": item["final_decision"],
            "split": "test" if str(pmid) in test_ids else "train",
        }
        for pmid, item in items.items()
    ]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("LICENSE", "README.upstream.md"):
        shutil.copyfile(src / name, out / name)
    return _write_jsonl(out / "pqal.jsonl", records)


def convert_meqsum(src: Path, out: Path, test_rows: int = MEQSUM_TEST_ROWS) -> int:
    """The MeQSum XLSX -> meqsum.jsonl; the last `test_rows` rows are "test"."""
    from openpyxl import load_workbook

    xlsx = next(src.glob("*.xlsx"))
    sheet = load_workbook(xlsx, read_only=True).worksheets[0]
    rows = list(sheet.iter_rows(values_only=True))
    header = [str(c).strip() for c in rows[0]]
    body = [dict(zip(header, r)) for r in rows[1:] if any(c is not None for c in r)]
    records = [
        {
            "id": re.sub(r"(\.xml)?\.txt$", "", str(row["File"]).strip()),
            "question": str(row["CHQ"]).strip(),
            "summary": " ".join(str(row["Summary"]).split()),
            "split": "test" if i >= len(body) - test_rows else "train",
        }
        for i, row in enumerate(body)
    ]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "README.upstream.md", out / "README.upstream.md")
    (out / "LICENSE").write_text(MEQSUM_LICENSE, encoding="utf-8")
    return _write_jsonl(out / "meqsum.jsonl", records)


def convert_from(shared_dir: Path | str, out_dir: Path | str = DATA_DIR) -> dict[str, int]:
    """Rebuild `data/` from the upstream files; returns each JSONL's size in bytes."""
    shared, out = Path(shared_dir), Path(out_dir)
    return {
        "pubmedqa": convert_pubmedqa(shared / "pubmedqa", out / "pubmedqa"),
        "meqsum": convert_meqsum(shared / "meqsum", out / "meqsum"),
    }


if __name__ == "__main__":  # python -m common.public_data SHARED_DIR [OUT_DIR]
    import sys

    print(convert_from(*sys.argv[1:3]))
