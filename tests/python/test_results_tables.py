"""docs/results/ holds what the docs cite, and the cited tables are the results files' figures."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "results_tables.py"
DOCS = ROOT / "docs"


def _script():
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_table_in_benchmarks_md_is_regenerated_from_its_file():
    res = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    printed = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60).stdout
    markdown = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    tables = printed.split("<!-- results/")[1:]
    assert len(tables) == len(_script().TABLES) >= 6
    for block in tables:
        name, _, table = block.partition(" -->\n")
        assert table.strip() in markdown, name
        assert f"results/{name}" in markdown, f"{name} is rendered but not cited"


def test_a_changed_figure_is_caught():
    rt = _script()
    markdown = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert rt.check(markdown) == []
    assert rt.check(markdown.replace("| 0.383 | 10,684 |", "| 0.383 | 10,685 |")) == [
        "train_step_2026-11-29.jsonl"
    ]
    assert "kernels_2026-11-29.jsonl" in rt.check(markdown.replace("**60.2%**", "60.2%"))


def _cited() -> set[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    text += (ROOT / "README.md").read_text(encoding="utf-8")
    found = set()
    for pattern in re.findall(r"results/([A-Za-z0-9_.*-]+\.(?:jsonl|txt|log))", text):
        found |= {p.name for p in (DOCS / "results").glob(pattern)} or {pattern}
    return found


def test_results_holds_exactly_the_cited_files_named_by_experiment_and_date():
    kept = {p.name for p in (DOCS / "results").iterdir()}
    cited = _cited()
    assert cited - kept == set(), f"cited but missing: {sorted(cited - kept)}"
    assert kept - cited == set(), f"kept but cited by no doc: {sorted(kept - cited)}"
    for name in kept:
        assert re.fullmatch(r"[a-z0-9_]+_\d{4}-\d{2}-\d{2}\.(jsonl|txt|log)", name), name
        assert not re.search(r"_(final\d*|trial\d*|merged|run\d+)[_.]", name), name
