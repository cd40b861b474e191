"""Stratified group-aware splits and their JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from diffmic.data.splits import (
    apply_split,
    load_split,
    merge_groups,
    save_split,
    stratified_group_split,
    unique_ids,
)
from diffmic.errors import DataError


def _labels() -> np.ndarray:
    y = np.array([0] * 100 + [1] * 50 + [2] * 10 + [3] * 3 + [4] * 1)
    return np.random.default_rng(5).permutation(y)


def _check_partition(split: dict[str, np.ndarray], n: int) -> None:
    allidx = np.concatenate([split["train"], split["val"], split["test"]])
    assert sorted(allidx.tolist()) == list(range(n))
    for v in split.values():
        assert v.dtype == np.int64


def test_deterministic_for_a_seed_and_seed_dependent() -> None:
    y = _labels()
    a = stratified_group_split(y, None, 0.15, 0.15, seed=3)
    b = stratified_group_split(y, None, 0.15, 0.15, seed=3)
    c = stratified_group_split(y, None, 0.15, 0.15, seed=4)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    _check_partition(a, len(y))


def test_stratified_per_class_fractions() -> None:
    y = _labels()
    s = stratified_group_split(y, None, 0.2, 0.1, seed=0)
    for c, n in [(0, 100), (1, 50), (2, 10)]:
        assert abs(int(np.sum(y[s["test"]] == c)) - 0.1 * n) <= 1
        assert abs(int(np.sum(y[s["val"]] == c)) - 0.2 * n) <= 1
    for c in range(5):  # every class (>= 1 sample) is present in train
        assert np.any(y[s["train"]] == c)


def test_small_classes_keep_train_samples() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    for seed in range(10):
        s = stratified_group_split(y, None, 0.45, 0.45, seed=seed)
        _check_partition(s, len(y))
        assert set(y[s["train"]].tolist()) == {0, 1, 2, 3}


def test_groups_stay_whole_and_use_majority_label() -> None:
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 60, size=300)
    y = (groups % 3).astype(np.int64)
    y[::17] = 2  # some groups have mixed labels
    for seed in range(3):
        s = stratified_group_split(y, [f"g{g}" for g in groups], 0.15, 0.15, seed=seed)
        _check_partition(s, len(y))
        owner: dict[int, str] = {}
        for name, idx in s.items():
            for g in set(groups[idx].tolist()):
                assert owner.setdefault(g, name) == name, f"group {g} in two splits"
        assert len(s["val"]) > 0 and len(s["test"]) > 0
        for c in range(3):
            assert np.any(y[s["train"]] == c)


def test_bad_fractions_and_group_length() -> None:
    with pytest.raises(DataError, match="sum below 1"):
        stratified_group_split([0, 1], None, 0.6, 0.5, 0)
    with pytest.raises(DataError, match="group values"):
        stratified_group_split([0, 1], ["a"], 0.1, 0.1, 0)


def test_save_load_apply_round_trip(tmp_path: Path) -> None:
    y = _labels()
    ids = [f"img{i}.png" for i in range(len(y))]
    s = stratified_group_split(y, None, 0.15, 0.15, 0)
    p = tmp_path / "run" / "split.json"
    save_split(p, s, ids)
    raw = json.loads(p.read_text())
    assert raw["test"] == [ids[i] for i in s["test"]]
    back = apply_split(load_split(p), ids, "x")
    for k in s:
        np.testing.assert_array_equal(back[k], s[k])
    shuffled = list(reversed(ids))  # same images in another order map by id, not position
    back2 = apply_split(load_split(p), shuffled, "x")
    assert sorted(shuffled[i] for i in back2["val"]) == sorted(ids[i] for i in s["val"])


def test_apply_split_errors_and_warnings(tmp_path: Path) -> None:
    p = tmp_path / "split.json"
    p.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["zzz"]}))
    with pytest.raises(DataError, match="1 id.*'zzz'"):
        apply_split(load_split(p), ["a", "b", "c"], "src")
    out = apply_split(load_split(p), ["a", "b", "c"], "src", ignore=["zzz"])
    assert out["test"].tolist() == [] and out["train"].tolist() == [0, 1]
    with pytest.warns(UserWarning, match="1 image"):
        apply_split(load_split(p), ["a", "b", "c", "zzz", "new"], "src")
    p.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": []}))
    with pytest.raises(DataError, match="both 'train' and 'val'"):
        load_split(p)
    p.write_text("{not json")
    with pytest.raises(DataError, match="split.json"):
        load_split(p)
    with pytest.raises(DataError, match="not found"):
        load_split(tmp_path / "nope.json")


def test_unique_ids() -> None:
    assert unique_ids(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]


def test_merge_groups_is_transitive() -> None:
    out = merge_groups(["a", "a", "b", "b", "c", "d"], ["h1", "h2", "h2", "h3", "h4", "h3"])
    assert len({out[0], out[1], out[2], out[3], out[5]}) == 1 and out[4] != out[0]
