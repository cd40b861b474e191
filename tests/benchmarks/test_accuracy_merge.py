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


def test_merge_refuses_an_edited_preset_or_row(parts: dict) -> None:
    accuracy = load_benchmark("accuracy")
    other = json.loads(parts["other"].read_text())
    other["settings"]["resolved_config"]["train"]["joint_train"] = False  # the preset file was edited between
    parts["other"].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="resolved_config"):
        accuracy.merge_results(copy.deepcopy(parts["main"]), [parts["other"]])
    other = split(parts["full"], {"dcg_init", "diffmic"})
    other["settings"]["row_overrides"]["diffmic"] = ["train.noise_draws=1"]  # same row name, other row
    parts["other"].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="row_overrides of diffmic"):
        accuracy.merge_results(parts["main"], [parts["other"]])


def test_a_failed_run_is_replaced_and_merging_twice_changes_nothing(parts: dict) -> None:
    accuracy = load_benchmark("accuracy")
    result = parts["main"]
    failed = next(r for r in result["runs"] if r["row"] == "diffmic" and r["seed"] == 1)
    result["runs"] = [r for r in result["runs"] if r is not failed] + [
        {"dataset": failed["dataset"], "seed": 1, "method": "diffmic", "row": "diffmic", "error": "Killed"}]
    accuracy.merge_results(result, [parts["other"]])
    diffmic_1 = [r for r in result["runs"] if r["row"] == "diffmic" and r["seed"] == 1]
    assert len(diffmic_1) == 1 and "error" not in diffmic_1[0] and diffmic_1[0]["merged_from"] == "other.json"
    once = copy.deepcopy(result)
    accuracy.merge_results(result, [parts["other"]])
    assert result == once and [m["runs"] for m in result["run"]["merged"]] == [4]


def test_merge_into_a_file_from_before_rows_existed(parts: dict) -> None:
    accuracy = load_benchmark("accuracy")
    result = parts["main"]
    del result["settings"]["rows"], result["settings"]["row_overrides"]
    accuracy.merge_results(result, [parts["other"]])
    assert "dcg_init" in result["settings"]["rows"]
    assert {r["row"] for r in result["runs"]} == {"diffmic", "classifier", "dcg_init"}


def test_merge_fills_keys_added_since_with_their_defaults(parts: dict) -> None:
    """A file written before a config key existed merges with one that has the key at its default
    (the behaviour from before the key), and not with one that set it to something else."""
    accuracy = load_benchmark("accuracy")
    main = copy.deepcopy(parts["main"])
    main["settings"]["resolved_config"]["eval"].pop("chain_noise", None)  # as files from before the key
    other = json.loads(parts["other"].read_text())
    other["settings"]["resolved_config"]["eval"]["chain_noise"] = "random"  # the default
    parts["other"].write_text(json.dumps(other))
    accuracy.merge_results(main, [parts["other"]])
    assert "dcg_init" in {r["row"] for r in main["runs"]}
    other["settings"]["resolved_config"]["eval"]["chain_noise"] = "qmc"
    parts["other"].write_text(json.dumps(other))
    main = copy.deepcopy(parts["main"])
    main["settings"]["resolved_config"]["eval"].pop("chain_noise", None)
    with pytest.raises(ValueError, match="resolved_config"):
        accuracy.merge_results(main, [parts["other"]])


def test_a_merged_file_keeps_the_commands_it_was_continued_from(parts: dict) -> None:
    """A merged file built over two invocations (``run.continues``) names both in the rendered section,
    not only its last command."""
    accuracy = load_benchmark("accuracy")
    other = json.loads(parts["other"].read_text())
    other["run"]["continues"] = ["python benchmarks/accuracy.py --seeds 0 --first-invocation"]
    parts["other"].write_text(json.dumps(other))
    result = parts["main"]
    accuracy.merge_results(result, [parts["other"]])
    assert result["run"]["merged"][0]["continues"] == other["run"]["continues"]
    line = next(x for x in accuracy.markdown(result).splitlines() if x.startswith("- Merged from `other.json`"))
    assert line.endswith(", continuing `python benchmarks/accuracy.py --seeds 0 --first-invocation`")
    plain = json.loads(parts["other"].read_text())
    del plain["run"]["continues"]
    parts["other"].write_text(json.dumps(plain))
    result = split(parts["full"], {"diffmic", "classifier"})
    accuracy.merge_results(result, [parts["other"]])
    assert "continues" not in result["run"]["merged"][0]
    assert "continuing" not in accuracy.markdown(result)


def test_a_section_whose_runs_mix_thread_counts_says_so(parts: dict) -> None:
    """fit s / run averages its runs: when they ran with different torch threads (own invocation,
    continued invocations, merged files) the section says the column is not a cost figure."""
    accuracy = load_benchmark("accuracy")
    note = "`fit s / run` averages runs made with"
    result = copy.deepcopy(parts["main"])
    accuracy.merge_results(result, [parts["other"]])  # both halves of one 1-thread process
    assert accuracy.thread_counts(result) == [result["run"]["torch_threads"]]
    assert note not in accuracy.markdown(result)
    other = json.loads(parts["other"].read_text())
    other["run"]["torch_threads"] = result["run"]["torch_threads"] + 1
    parts["other"].write_text(json.dumps(other))
    result = copy.deepcopy(parts["main"])
    accuracy.merge_results(result, [parts["other"]])
    assert result["run"]["merged"][0]["torch_threads"] == other["run"]["torch_threads"]
    mixed = sorted({parts["main"]["run"]["torch_threads"], other["run"]["torch_threads"]})
    assert accuracy.thread_counts(result) == mixed
    assert f"{note} {mixed[0]} and {mixed[1]} torch threads" in accuracy.markdown(result)
    # an earlier invocation known only by its command counts too; no --threads means every core
    result = copy.deepcopy(parts["main"])
    result["run"]["continues"] = ["python benchmarks/accuracy.py --seeds 0"]
    assert accuracy.thread_counts(result) == sorted({result["run"]["torch_threads"], result["run"]["cpu_count"]})
    result["run"]["continues"] = [f"python benchmarks/accuracy.py --threads={result['run']['torch_threads']}"]
    assert accuracy.thread_counts(result) == [result["run"]["torch_threads"]]
