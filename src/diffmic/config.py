"""Typed configuration: dataclasses, YAML load/save, dotted overrides and validation.

The dataclasses are frozen: a config is validated once, when it is built, and never changes
afterwards; derive a changed copy with :func:`replace` (validated again). Networks never see the
config: ``build_model`` reads it for them.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from diffmic._io import atomic_write_text
from diffmic.errors import ConfigError, first_line


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are read, split and augmented."""

    format: str = "medmnist"  # medmnist | folder | csv | isic2018 | aptos2019 | pickle
    path: str = ""  # .npz file, dataset root folder, or CSV manifest (depends on ``format``)
    image_size: int | None = None  # None: keep the stored size (npz); files are resized to it
    channels: int | None = None  # None: as stored; 1 or 3 converts
    class_names: list[str] | None = None  # None: from the reader (or "0".."C-1")
    # Splits for layouts that ship none (stratified, fixed seed, group-aware where possible).
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    split_file: str | None = None  # reuse a split written by an earlier run
    # Layout-specific options (folder / csv / isic2018 / aptos2019 / pickle readers).
    image_dir: str | None = None
    path_column: str = "path"
    label_column: str = "label"
    group_column: str | None = None
    cache_dir: str | None = None  # decoded+resized uint8 cache; None: <path>/.diffmic_cache
    skip_corrupt: bool = False  # skip unreadable images with a warning count instead of failing
    # Loading and augmentation (augmentation runs on batches, inside the training step).
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    hflip: bool = True
    vflip: bool = False
    rotation: float = 15.0  # degrees, uniform in [-rotation, rotation]


@dataclass(frozen=True)
class ModelConfig:
    """Networks: the DCG guidance network and the conditional label denoiser."""

    backbone: str = "resnet18"  # timm name for the DCG global branch
    local_backbone: str | None = None  # timm name for the DCG local branch (None: same as backbone)
    denoiser_backbone: str = "resnet18"  # timm name for the denoiser image encoder
    pretrained: bool = False  # ImageNet weights (needs network access the first time)
    small_input: bool | None = None  # 3x3 stride-1 stem, no max-pool; None: image_size <= 64
    cam_size: int | None = None  # None: native feature-map size
    num_crops: int = 6  # K
    crop_size: int | None = None  # ROI crop side in pixels; None: max(8, round(image_size / 7)), 32 at 224
    top_t: float = 1.0  # top-t% CAM aggregation (1.0 = mean, as the original)
    mil_hidden: int = 128
    feature_dim: int = 6144  # denoiser hidden width
    share_encoder: bool = False  # denoiser reuses the DCG global features (no own encoder)
    denoiser_skip: bool = False  # learnable ε̂ += c(t)(y_t − ŷ), MMSE-initialised (not in the original)
    denoiser_dropout: float = 0.0  # dropout on the denoiser's hidden layers (training only)
    # Saliency map the ROI crops are chosen on: class_sum (GMIC: sum of min-max normalised class
    # maps) | top_class (the map of the prior's top class) | prior_weighted (maps weighted by the prior)
    roi_saliency: str = "class_sum"
    # The DCG's local branch (ROI crops -> CNN -> gated-attention MIL). false: the paper's ablation
    # "without the local prior": the prior is the global branch alone and no crops are taken.
    local_branch: bool = True
    # Weight w of the global branch in the DCG's fused logits w·g + (1 − w)·l (0.5: the original's mean).
    global_weight: float = 0.5
    # The diffusion conditions on, and starts from, softmax(DCG logits / prior_temperature), in training
    # and at inference alike; the DCG's own prior (its cross-entropy, the reported prior) stays at 1.
    # 1: the original. > 1 spreads a confident prior's scores over more of the simplex.
    prior_temperature: float = 1.0


@dataclass(frozen=True)
class DiffusionConfig:
    """Label-space diffusion schedule and the inference sampler."""

    timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ddim"  # ddim | ancestral | truncated (the original's test chain)
    sampling_steps: int = 10
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, model selection and run bookkeeping."""

    epochs: int = 100  # joint (diffusion) epochs after DCG pre-training
    dcg_pretrain_epochs: int = 15
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: float = 4.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    dcg_lr: float = 2e-4
    dcg_weight_decay: float = 0.0
    # DCG pre-training schedule: constant (the original) | warmup_cosine (per iteration, as the
    # plain classifier: linear warm-up over dcg_warmup_epochs, cosine to 0 at the end of pre-training)
    dcg_schedule: str = "constant"
    dcg_warmup_epochs: float = 1.0
    dcg_joint_lr: float | None = None  # DCG learning rate in the joint phase (None: dcg_lr)
    # Cross-fitted priors: >= 2 trains k fold DCGs (each on the other folds' images, for
    # dcg_pretrain_epochs) and feeds the denoiser out-of-fold priors; 0 = in-sample priors.
    crossfit_folds: int = 0
    joint_train: bool = True  # one DCG cross-entropy step after every diffusion step
    # The denoiser's own image encoder when the joint phase starts: random (its initialisation) |
    # dcg (a copy of the pre-trained DCG's global backbone; the from-scratch stand-in for the
    # original's ImageNet weights). Needs model.denoiser_backbone == model.backbone.
    denoiser_encoder_init: str = "random"
    aux_loss: str = "fused"  # fused (original) | all (fused + global + local CE)
    # Diffusion phase: weight of a cross-entropy on a linear head over the denoiser's image embedding
    # (training only; the head is not part of the model). 0 = off, the original: the denoiser's encoder
    # learns from the ε loss alone.
    denoiser_ce_weight: float = 0.0
    # Harder training targets for the denoiser: each training prior (per image and noise draw, the same for
    # the three streams) is tempered, softmax(log p / tau), with tau log-uniform on [1, prior_temper_max];
    # 1 = off (the original). Inference always uses the prior as it is.
    prior_temper_max: float = 1.0
    # Image-conditioning dropout (classifier-free-guidance style): in the diffusion loss, each row (image and
    # noise draw, the same for the three streams) has its image features replaced by ones, the neutral value of
    # the denoiser's multiplicative gate, with this probability, so the MLP also learns an image-free path
    # from (y_t, prior, t). 0 = off (the original). Inference always sees the image.
    image_dropout: float = 0.0
    mmd_weight: float = 0.5
    noise_draws: int = 1  # (t, ε) draws per image per step; >1 reuses the features (cheap variance cut)
    ema_decay: float = 0.999
    ema_eval: bool = True  # validate / export with the EMA weights of the denoiser
    val_every: int = 1  # epochs between validations
    select_metric: str = "acc"  # acc | f1 | qwk | auroc, on the validation split
    seed: int = 0
    accelerator: str = "cpu"  # cpu | gpu | auto
    devices: int = 1  # processes (devices) per node
    num_nodes: int = 1  # machines; the world size is num_nodes * devices (docs: README "Several GPU nodes")
    strategy: str = "auto"  # auto | ddp | ddp_spawn
    precision: str = "32-true"
    out_dir: str = "runs"
    run_name: str | None = None  # None: <dataset>-<timestamp>
    progress: bool = True  # progress bars in a terminal, one line per epoch otherwise
    logger: str = "csv"  # csv | tensorboard (TensorBoard event files in logs/tensorboard/ beside logs/metrics.csv)


@dataclass(frozen=True)
class EvalConfig:
    """Inference options."""

    samples: int = 1  # reverse chains per image (features computed once)
    readout: str = "mean_softmax"  # mean_path | vote | mean_softmax (diffmic.diffusion.readout)
    temperature: float = 0.1  # softmax temperature on y0 (see the readout)
    fit_temperature: bool = False  # mean_path: replace the temperature by one fitted on val after training
    chain_noise: str = "random"  # random | qmc: DDIM chains start noise (diffusion.sampling.chain_start_noise)
    seed: int = 0


@dataclass(frozen=True)
class DiffMICConfig:
    """The full, resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (only str/int/float/bool/None/list), safe for ``weights_only``."""
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> DiffMICConfig:
        data = dict(data or {})
        kwargs = {}
        for f in fields(cls):
            section = data.pop(f.name, None)
            sub_cls = f.default_factory  # type: ignore[misc]
            kwargs[f.name] = _build_section(sub_cls, section, f"{source}: {f.name}")  # type: ignore[arg-type]
        if data:
            raise ConfigError(
                f"{source}: unknown section(s) {sorted(data)}; valid: {[f.name for f in fields(cls)]}"
            )
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_yaml(
        cls, path: str | Path | None = None, overrides: list[str] | None = None
    ) -> DiffMICConfig:
        """Load a YAML file (or defaults when ``path`` is None) and apply ``a.b=value`` overrides."""
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                raw = yaml.safe_load(p.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p}: not valid YAML ({first_line(exc, typed=False)})") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{p}: cannot read the config file ({type(exc).__name__})") from None
            if raw is None:
                raise ConfigError(f"{p}: the config file is empty (omit --config to use the defaults)")
            if not isinstance(raw, dict):
                raise ConfigError(f"{p}: top level must be a mapping of sections")
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw, source=str(path) if path else "config")

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        d, m, df, t, e = self.data, self.model, self.diffusion, self.train, self.eval
        _choice("data.format", d.format, ("medmnist", "folder", "csv", "isic2018", "aptos2019", "pickle"))
        _choice("diffusion.schedule", df.schedule, ("linear", "cosine"))
        _choice("diffusion.sampler", df.sampler, ("ddim", "ancestral", "truncated"))
        _choice("train.aux_loss", t.aux_loss, ("fused", "all"))
        _choice("train.select_metric", t.select_metric, ("acc", "f1", "qwk", "auroc"))
        _choice("train.dcg_schedule", t.dcg_schedule, ("constant", "warmup_cosine"))
        _choice("train.logger", t.logger, ("csv", "tensorboard"))
        _choice("eval.readout", e.readout, ("mean_path", "vote", "mean_softmax"))
        _choice("eval.chain_noise", e.chain_noise, ("random", "qmc"))
        if e.chain_noise == "qmc" and df.sampler != "ddim":
            raise ConfigError(f"eval.chain_noise=qmc sets the starting noise of DDIM chains; diffusion.sampler is "
                              f"{df.sampler!r}, which draws its noise at every step (use random, or sampler ddim)")
        _choice("model.roi_saliency", m.roi_saliency, ("class_sum", "top_class", "prior_weighted"))
        if not (0.0 <= m.global_weight <= 1.0):
            raise ConfigError(f"model.global_weight must be in [0, 1] (0.5 = the original's mean), "
                              f"got {m.global_weight}")
        if not (m.prior_temperature > 0 and math.isfinite(m.prior_temperature)):
            raise ConfigError(f"model.prior_temperature must be a finite number > 0 (1 = off), "
                              f"got {m.prior_temperature}")
        _choice("train.denoiser_encoder_init", t.denoiser_encoder_init, ("random", "dcg"))
        if t.denoiser_encoder_init == "dcg":
            if m.share_encoder:
                raise ConfigError("train.denoiser_encoder_init=dcg needs the denoiser's own encoder; "
                                  "model.share_encoder=true already uses the DCG's features")
            if m.denoiser_backbone != m.backbone:
                raise ConfigError(f"train.denoiser_encoder_init=dcg copies the DCG backbone: model.denoiser_backbone "
                                  f"({m.denoiser_backbone}) must equal model.backbone ({m.backbone})")
        if not t.denoiser_ce_weight >= 0.0:
            raise ConfigError(f"train.denoiser_ce_weight must be >= 0, got {t.denoiser_ce_weight}")
        if not t.prior_temper_max >= 1.0:
            raise ConfigError(f"train.prior_temper_max must be >= 1 (1 = off), got {t.prior_temper_max}")
        if not 0.0 <= t.image_dropout < 1.0:
            raise ConfigError(f"train.image_dropout must be in [0, 1), got {t.image_dropout}")
        if not 0.0 <= m.denoiser_dropout < 1.0:
            raise ConfigError(f"model.denoiser_dropout must be in [0, 1), got {m.denoiser_dropout}")
        if t.crossfit_folds == 1 or t.crossfit_folds < 0:
            raise ConfigError(f"train.crossfit_folds must be 0 (off) or >= 2, got {t.crossfit_folds}")
        if t.crossfit_folds and t.dcg_pretrain_epochs == 0:
            raise ConfigError("train.crossfit_folds needs train.dcg_pretrain_epochs > 0 (the fold DCGs' budget)")
        _positive("data.batch_size", d.batch_size)
        _positive("data.eval_batch_size", d.eval_batch_size)
        _positive("diffusion.timesteps", df.timesteps)
        _positive("diffusion.sampling_steps", df.sampling_steps)
        _positive("model.num_crops", m.num_crops)
        _positive("model.feature_dim", m.feature_dim)
        _positive("eval.samples", e.samples)
        _positive("train.val_every", t.val_every)
        _positive("train.noise_draws", t.noise_draws)
        _positive("train.num_nodes", t.num_nodes)
        if df.sampling_steps > df.timesteps:
            raise ConfigError(
                f"diffusion.sampling_steps ({df.sampling_steps}) exceeds diffusion.timesteps ({df.timesteps})"
            )
        if not 0.0 < m.top_t <= 1.0:
            raise ConfigError(f"model.top_t must be in (0, 1], got {m.top_t}")
        if d.image_size is not None and d.image_size < 8:
            raise ConfigError(f"data.image_size must be >= 8, got {d.image_size}")
        if d.channels not in (None, 1, 3):
            raise ConfigError(f"data.channels must be 1, 3 or null, got {d.channels}")
        if not (0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1 and d.val_fraction + d.test_fraction < 1):
            raise ConfigError(
                "data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1, "
                f"got {d.val_fraction} and {d.test_fraction}"
            )
        for name, value in (("train.epochs", t.epochs), ("train.dcg_pretrain_epochs", t.dcg_pretrain_epochs)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if t.epochs + t.dcg_pretrain_epochs == 0:
            raise ConfigError("train.epochs + train.dcg_pretrain_epochs must be > 0, got 0 and 0")
        if not 0.0 <= t.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
        if e.temperature <= 0:
            raise ConfigError(f"eval.temperature must be > 0, got {e.temperature}")
        if df.eta < 0:
            raise ConfigError(f"diffusion.eta must be >= 0, got {df.eta}")
        if len(d.mean) != len(d.std) or any(s <= 0 for s in d.std):
            raise ConfigError("data.mean and data.std must have equal length and std > 0")


# ---------------------------------------------------------------------- helpers
def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose from {list(options)}")


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _build_section(cls: type, section: Any, where: str) -> Any:
    if section is None:
        return cls()
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    values = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in section.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint (int/float/bool/str/list[...] and Optional)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to a raw config dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r}: key must be section.key (e.g. train.epochs=5)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    section = raw.setdefault(parts[0], {})
    if section is None:
        section = raw[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: {parts[0]} is not a section")
    section[parts[1]] = value


def replace(cfg: DiffMICConfig, **sections: dict[str, Any]) -> DiffMICConfig:
    """Return a copy of ``cfg`` with some fields of some sections changed (validated)."""
    raw = cfg.to_dict()
    for name, changes in sections.items():
        raw.setdefault(name, {}).update(changes)
    return DiffMICConfig.from_dict(raw)


__all__ = [
    "DataConfig",
    "DiffMICConfig",
    "DiffusionConfig",
    "EvalConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_override",
    "replace",
]
