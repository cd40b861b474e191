"""benchmarks/accuracy.py --render --merge: rows run as separate processes join one results file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parents[2]
FULL = REPO / "benchmarks" / "results" / "preset-breastmnist.json"  # 4 rows x 3 seeds, one process


def split(full: dict, rows: set[str]) -> dict:
    """The results file a process running only ``rows`` would have written."""
    part = copy.deepcopy(full)
    part["runs"] = [r for r in part["runs"] if r["row"] in rows]
    part["settings"]["rows"] = [r for r in part["settings"]["rows"] if r in rows]
    part["settings"]["row_overrides"] = {r: v for r, v in part["settings"]["row_overrides"].items() if r in rows}
    return part


@pytest.fixture
def parts(tmp_path: Path) -> dict:
    full = json.loads(FULL.read_text())
    main, other = split(full, {"diffmic", "classifier"}), split(full, {"dcg_init", "diffmic"})
    (tmp_path / "other.json").write_text(json.dumps(other))
    return {"full": full, "main": main, "other": tmp_path / "other.json", "tmp": tmp_path}


def test_merge_adds_the_missing_runs_once(parts: dict) -> None:
    accuracy = load_benchmark("accuracy")
    result = parts["main"]
    accuracy.merge_results(result, [parts["other"]])
    rows = [(r["row"], r["seed"]) for r in result["runs"]]
    assert len(rows) == len(set(rows)) == 9  # diffmic from the main file only, dcg_init added
    assert {r["row"] for r in result["runs"] if r.get("merged_from") == "other.json"} == {"dcg_init"}
    assert result["settings"]["rows"] == ["diffmic", "classifier", "dcg_init"]
    assert result["run"]["merged"][0]["runs"] == 3
    full = accuracy.summarise([r for r in parts["full"]["runs"] if r["row"] != "shared"])
    assert accuracy.summarise(result["runs"]) == full


def test_merge_refuses_other_settings(parts: dict) -> None:
    accuracy = load_benchmark("accuracy")
    other = json.loads(parts["other"].read_text())
    other["settings"]["diffmic_split"] = [12, 13]
    parts["other"].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different settings.*diffmic_split"):
        accuracy.merge_results(parts["main"], [parts["other"]])
    with pytest.raises(ValueError, match="not found"):
        accuracy.merge_results(parts["main"], [parts["tmp"] / "missing.json"])


def test_render_merge_rewrites_the_file_and_the_section(parts: dict) -> None:
    accuracy = load_benchmark("accuracy")
    tmp = parts["tmp"]
    out, docs, data = tmp / "main.json", tmp / "benchmarks.md", tmp / "data"
    out.write_text(json.dumps(parts["main"]))
    docs.write_text("# Benchmarks\n")
    data.mkdir()
    (data / "breastmnist.npz").touch()  # --render reads no data
    rc = accuracy.main(["--data-dir", str(data), "--out", str(out), "--docs", str(docs), "--render",
                        "--merge", str(parts["other"]), "--section", "preset", "--title", "Preset"])
    assert rc == 0
    assert {r["row"] for r in json.loads(out.read_text())["runs"]} == {"diffmic", "classifier", "dcg_init"}
    section = docs.read_text().split("<!-- preset:start -->")[1]
    assert "- Merged from `other.json` (3 run(s)" in section and "| breastmnist | dcg_init |" in section
    rc = accuracy.main(["--data-dir", str(data), "--out", str(out), "--docs", str(docs), "--render",
                        "--merge", str(tmp / "nope.json")])
    assert rc == 2
