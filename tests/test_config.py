"""Typed config: YAML round trip, dotted overrides, unknown keys, type and choice validation."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from diffmic.config import DiffMICConfig, apply_override, replace
from diffmic.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load(*overrides: str) -> DiffMICConfig:
    return DiffMICConfig.from_yaml(None, ["data.path=x", *overrides])


def test_defaults_validate():
    cfg = DiffMICConfig()
    cfg.validate()
    assert cfg.diffusion.timesteps == 1000 and cfg.diffusion.schedule == "linear"
    assert cfg.train.mmd_weight == 0.5


def test_yaml_dataclass_yaml_round_trip(tmp_path):
    cfg = load("train.epochs=7", "model.backbone=test_resnet", "data.mean=[0.1, 0.2, 0.3]",
               "data.std=[0.4, 0.5, 0.6]", "data.class_names=[a, b]", "diffusion.eta=0.25",
               "model.small_input=false")
    p = tmp_path / "cfg.yaml"
    cfg.save(p)
    again = DiffMICConfig.from_yaml(p)
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()
    assert yaml.safe_load(p.read_text()) == cfg.to_dict()
    assert again.data.class_names == ["a", "b"] and again.model.small_input is False


def test_from_dict_to_dict_round_trip():
    cfg = load("eval.samples=3")
    assert DiffMICConfig.from_dict(cfg.to_dict()) == cfg


def test_override_is_typed():
    cfg = load("train.epochs=5", "train.lr=0.01", "data.hflip=false", "model.crop_size=16",
               "train.run_name=myrun", "diffusion.sampler=truncated", "data.image_size=null")
    assert cfg.train.epochs == 5 and type(cfg.train.epochs) is int
    assert cfg.train.lr == 0.01 and type(cfg.train.lr) is float
    assert cfg.data.hflip is False
    assert cfg.model.crop_size == 16
    assert cfg.train.run_name == "myrun"
    assert cfg.diffusion.sampler == "truncated"
    assert cfg.data.image_size is None


def test_int_is_accepted_for_float():
    cfg = load("train.lr=1")
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_override_applies_on_top_of_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: x\ntrain:\n  epochs: 3\n  lr: 0.5\n")
    cfg = DiffMICConfig.from_yaml(p, ["train.epochs=9"])
    assert cfg.train.epochs == 9 and cfg.train.lr == 0.5


@pytest.mark.parametrize("bad", ["train.epochs", "epochs=5", "a.b.c=1", ".x=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        load(bad)


def test_unknown_section_named():
    with pytest.raises(ConfigError, match="trainer"):
        load("trainer.epochs=5")


def test_unknown_key_named():
    with pytest.raises(ConfigError, match="epochz"):
        load("train.epochz=5")
    with pytest.raises(ConfigError, match="bogus"):
        DiffMICConfig.from_dict({"model": {"bogus": 1}})


@pytest.mark.parametrize("override,key", [
    ("train.epochs=five", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("data.batch_size=[1, 2]", "data.batch_size"),
    ("model.backbone=[resnet18]", "model.backbone"),
    ("model.backbone=true", "model.backbone"),
    ("data.hflip=1", "data.hflip"),
    ("data.hflip=yes_please", "data.hflip"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=false", "train.lr"),
    ("data.mean=0.5", "data.mean"),
    ("data.mean=[a]", "data.mean"),
    ("model.small_input=3", "model.small_input"),
    ("data.image_size=big", "data.image_size"),
])
def test_wrong_type_names_key(override, key):
    with pytest.raises(ConfigError) as ei:
        load(override)
    assert key in str(ei.value)


def test_section_must_be_mapping():
    with pytest.raises(ConfigError, match="train"):
        DiffMICConfig.from_dict({"train": [1, 2]})


@pytest.mark.parametrize("override,options", [
    ("diffusion.sampler=dpm", ["ddim", "ancestral", "truncated"]),
    ("diffusion.schedule=quadratic", ["linear", "cosine"]),
    ("data.format=parquet", ["medmnist", "folder", "csv", "isic2018", "aptos2019", "pickle"]),
    ("train.select_metric=loss", ["acc", "f1", "qwk", "auroc"]),
    ("train.aux_loss=none", ["fused", "all"]),
])
def test_invalid_choice_lists_options(override, options):
    with pytest.raises(ConfigError) as ei:
        load(override)
    msg = str(ei.value)
    assert override.split("=")[1] in msg
    for o in options:
        assert o in msg


@pytest.mark.parametrize("override", [
    "diffusion.timesteps=0", "diffusion.sampling_steps=0", "data.batch_size=-1", "model.top_t=0",
    "model.top_t=1.5", "eval.temperature=0", "diffusion.eta=-0.1", "data.channels=2", "train.ema_decay=1.0",
    "data.val_fraction=0.9", "data.test_fraction=1.0", "data.image_size=4", "model.feature_dim=0",
])
def test_invalid_values(override):
    with pytest.raises(ConfigError):
        load(override)


@pytest.mark.parametrize("override", [
    "train.epochs=-1", "train.dcg_pretrain_epochs=-2", "data.val_fraction=0.9", "model.top_t=1.5",
    "train.ema_decay=1.0", "eval.temperature=0", "diffusion.eta=-0.1",
])
def test_invalid_value_errors_name_the_option_and_the_value(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as ei:
        load(override)
    msg = str(ei.value)
    assert key in msg and str(float(value) if "." in value else int(value)) in msg


def test_no_epochs_at_all_is_refused():
    with pytest.raises(ConfigError, match=r"train.epochs \+ train.dcg_pretrain_epochs must be > 0"):
        load("train.epochs=0", "train.dcg_pretrain_epochs=0")


def test_sampling_steps_cannot_exceed_timesteps():
    with pytest.raises(ConfigError, match="sampling_steps"):
        load("diffusion.timesteps=10", "diffusion.sampling_steps=11")
    load("diffusion.timesteps=10", "diffusion.sampling_steps=10")


def test_mean_std_lengths():
    with pytest.raises(ConfigError):
        load("data.mean=[0.5, 0.5]", "data.std=[0.5]")


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        DiffMICConfig.from_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError):
        DiffMICConfig.from_yaml(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        DiffMICConfig.from_yaml(top)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="empty"):  # likely a truncated copy; no --config means defaults
        DiffMICConfig.from_yaml(empty)
    sections_only = tmp_path / "sections.yaml"
    sections_only.write_text("train: {}\n")
    assert DiffMICConfig.from_yaml(sections_only) == DiffMICConfig()


def test_apply_override_raw_dict():
    raw = {}
    apply_override(raw, "train.epochs=5")
    apply_override(raw, "data.class_names=[x, y]")
    assert raw == {"train": {"epochs": 5}, "data": {"class_names": ["x", "y"]}}


def test_replace_validates_and_copies():
    cfg = load()
    new = replace(cfg, train={"epochs": 2})
    assert new.train.epochs == 2 and cfg.train.epochs == 100
    with pytest.raises(ConfigError):
        replace(cfg, diffusion={"sampler": "nope"})


def test_to_dict_is_plain():
    def check(v):
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, str)
                check(x)
        elif isinstance(v, list):
            for x in v:
                check(x)
        else:
            assert v is None or type(v) in (str, int, float, bool)

    check(load().to_dict())


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.y*ml")) or [None], ids=lambda p: p.name if p else "none")
def test_shipped_configs_load(path):
    if path is None:
        pytest.skip("no YAML files in configs/ yet")
    cfg = DiffMICConfig.from_yaml(path)
    assert isinstance(cfg, DiffMICConfig)


def test_exponent_without_dot_is_a_float_and_words_are_still_refused():
    cfg = DiffMICConfig.from_yaml(None, ["train.lr=1e-3", "train.dcg_lr=2E-4"])  # YAML 1.1 reads these as strings
    assert cfg.train.lr == 1e-3 and type(cfg.train.lr) is float and cfg.train.dcg_lr == 2e-4
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        DiffMICConfig.from_yaml(None, ["train.lr=fast"])


def test_config_is_frozen_after_validation():
    import dataclasses

    cfg = DiffMICConfig.from_yaml(None, ["train.epochs=3"])
    for section, key in (("train", "epochs"), ("data", "path"), ("model", "backbone"), ("eval", "samples")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), key, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = cfg.train
    assert replace(cfg, train={"epochs": 4}).train.epochs == 4 and cfg.train.epochs == 3


@pytest.mark.parametrize("key,names", [
    ("eval.readout", "diffmic.diffusion.readout:READOUTS"),
    ("eval.chain_noise", "diffmic.diffusion.sampling:CHAIN_NOISES"),
    ("diffusion.sampler", "diffmic.diffusion.sampling:SAMPLERS"),
    ("model.roi_saliency", "diffmic.models.roi:SALIENCY_MODES"),
    ("diffusion.schedule", "diffmic.diffusion.schedule:BETA_SCHEDULES"),
])
def test_config_choices_match_the_package(key, names):
    # config.py keeps its own literal lists so that loading a config imports no torch; they must not
    # drift from the constants the code dispatches on: every package value loads, and the refusal of
    # an unknown value lists exactly the package's values.
    module, attr = names.split(":")
    values = tuple(getattr(importlib.import_module(module), attr))
    for v in values:
        load(f"{key}={v}")
    with pytest.raises(ConfigError) as ei:
        load(f"{key}=no_such_choice")
    listed = ast.literal_eval(str(ei.value).split("choose from", 1)[1].strip())
    assert tuple(listed) == tuple(values)
