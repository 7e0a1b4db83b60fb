"""The docs stay true to the code: the generated run-config reference, links, paths and module names.

README.md is what a newcomer reads in five minutes; everything else lives in docs/, as Markdown a
documentation site serves. These checks fail when a page drifts from the code it describes: a
run-config key changed without regenerating its reference, a link to a page or heading that does
not exist, a file path or `python -m` module that is no longer there, a module the architecture
page does not place. After changing `common.config.KEYS`, regenerate the reference with

    python tests/test_docs.py
"""

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from clinfed.common.config import KEYS, reference_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
RUN_CONFIG = DOCS / "run-config.md"
ARCHITECTURE = DOCS / "architecture.md"
BEGIN, END = "<!-- BEGIN GENERATED", "<!-- END GENERATED -->"
REGENERATE = "python tests/test_docs.py"
PACKAGES = ("cli", "common", "client", "server", "simulations")

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)
MODULE_RUN = re.compile(r"python -m ([\w.]+)")
REPO_PATH = re.compile(r"^(cli|common|client|server|simulations|tests|data|docs)/[\w./-]*$")


def _split_generated(text: str) -> tuple[str, str, str]:
    """(before and including the BEGIN line, the generated table, from the END marker on)."""
    start = text.index(BEGIN)
    start = text.index("\n", start) + 1
    end = text.index(END)
    return text[:start], text[start:end], text[end:]


def regenerate() -> None:
    """Rewrite the generated part of docs/run-config.md from KEYS (the rest of the page is kept)."""
    head, _, tail = _split_generated(RUN_CONFIG.read_text())
    RUN_CONFIG.write_text(head + reference_markdown() + tail)


def _prose(text: str) -> str:
    """The text without fenced code blocks (their contents are not links or headings)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs both make it for plain headings."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(h) for h in HEADING.findall(_prose(path.read_text()))}


# ------------------------------------------------------------------ the generated run-config reference

def test_the_run_config_reference_is_generated_from_the_key_table():
    _, table, _ = _split_generated(RUN_CONFIG.read_text())
    assert table == reference_markdown(), (
        f"docs/run-config.md is out of step with common.config.KEYS; regenerate it with `{REGENERATE}`")


def test_the_run_config_page_documents_every_key():
    text = RUN_CONFIG.read_text()
    missing = [k for k in KEYS if f"`{k}`" not in text]
    assert not missing, f"docs/run-config.md lacks run-config keys: {missing}; regenerate it with `{REGENERATE}`"


def test_the_reference_follows_the_key_table(monkeypatch):
    """The rendering shows each key's type, default, range and meaning, and changes when the table does."""
    table = reference_markdown()
    assert "| `hospitals` | integer | `6` | 2 to 500 | hospitals in the generated federation" in table
    assert "| `precision` | text | `\"auto\"` | `auto`, `fp32`, `bf16` |" in table
    assert "| `dp` | boolean | `false` | true, false |" in table
    assert "| `learning-rate` | number | `0.001` | 1e-07 to 1 |" in table
    assert "./runs/&lt;timestamp>" in table  # a bare <timestamp> would vanish on a documentation site
    assert len(table.strip().splitlines()) == len(KEYS) + 2
    default, kind, allowed, meaning = KEYS["lora-rank"]
    monkeypatch.setitem(KEYS, "lora-rank", (default + 1, kind, allowed, meaning + " | changed"))
    changed = reference_markdown()
    assert changed != table and f"| `lora-rank` | integer | `{default + 1}` |" in changed
    assert "changed" in changed and "\\| changed" in changed  # a pipe cannot break the table


# ------------------------------------------------------------------ README and pages

def test_the_readme_is_read_in_five_minutes():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/ (at most 250)"
    for command in ('pip install -e . && clinfed simulate --out runs/default',
                    'pip install -e ".[test]" && python -m pytest -q'):
        assert command in README.read_text(), command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_each_page_opens_with_a_title_and_its_purpose(page):
    blocks = [b.strip() for b in page.read_text().split("\n\n") if b.strip()]
    assert blocks[0].startswith("# ") and "\n" not in blocks[0], f"{page.name}: first line is not a title"
    assert not blocks[1].startswith(("#", "|", "```", "- ", "<!--")), f"{page.name}: no purpose paragraph"


def _links(path: Path):
    for target in LINK.findall(CODE.sub("", _prose(path.read_text()))):
        if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            yield target


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for path in [README, *PAGES]:
        for target in _links(path):
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
            elif path.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
                broken.append(f"{path.relative_to(ROOT)}: {target} (outside docs/, which a site would not serve)")
    assert not broken, "\n".join(broken)


def test_every_file_path_and_module_the_docs_name_exists():
    """No stale file list: a path in `code` must exist, and `python -m X` / `clinfed.x.y` must resolve."""
    stale = []
    for path in [README, *PAGES]:
        text = path.read_text()
        spans = CODE.findall(_prose(text))
        for span in spans:
            if REPO_PATH.match(span) and not (ROOT / span).exists():
                stale.append(f"{path.relative_to(ROOT)}: `{span}` does not exist")
        runs = set(MODULE_RUN.findall(text)) - {"pytest", "pip", "venv"}
        # clinfed's modules run under the installed namespace (`simulations.x` resolves only from a checkout)
        stale += [f"{path.relative_to(ROOT)}: python -m {name} is not a clinfed module" for name in sorted(runs)
                  if not name.startswith("clinfed.")]
        names = runs | {m for s in spans for m in re.findall(r"\bclinfed(?:\.\w+)+", s)}
        stale += [f"{path.relative_to(ROOT)}: {name} does not resolve" for name in sorted(names)
                  if not _resolves(name)]
    assert not stale, "\n".join(stale)


def _resolves(name: str) -> bool:
    """A module, or a name defined at the top of one, without importing it."""
    if importlib.util.find_spec(name) is not None:
        return True
    parent, _, attr = name.rpartition(".")
    spec = importlib.util.find_spec(parent) if parent else None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    tree = ast.parse(Path(spec.origin).read_text())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return attr in defined


def test_the_architecture_page_places_every_module():
    text = ARCHITECTURE.read_text()
    unplaced = []
    for name in PACKAGES:
        folder = ROOT / name
        for module in sorted(folder.rglob("*.py")):
            if "__pycache__" in module.parts:
                continue
            body = ast.parse(module.read_text()).body
            if module.name == "__init__.py" and len(body) <= 1:  # empty or only a docstring
                continue
            rel = module.relative_to(ROOT).as_posix()
            if f"`{rel}`" not in text:
                unplaced.append(rel)
    assert not unplaced, f"docs/architecture.md does not place: {unplaced}"


if __name__ == "__main__":
    regenerate()
    sys.stdout.write(f"rewrote {RUN_CONFIG.relative_to(ROOT)} from common.config.KEYS\n")
