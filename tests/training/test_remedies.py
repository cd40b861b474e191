"""Training remedies of the diffusion-vs-prior work: frozen DCG, cross-fitted priors, DCG recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from test_training_units import _synthetic_bundle

from diffmic.config import DiffMICConfig
from diffmic.training.crossfit import crossfit_priors, stratified_folds
from diffmic.training.module import DiffMICModule, warmup_cosine

BASE = ["data.path=synthetic", *TINY_OVERRIDES, "data.batch_size=16", "eval.samples=2",
        "train.dcg_pretrain_epochs=1", "train.epochs=2", "train.warmup_epochs=1.0"]


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Snapshots:
    """A Lightning callback keeping the DCG and denoiser states at the start of the joint phase and at the end."""

    def __new__(cls):
        import lightning as L

        class _Cb(L.Callback):
            def __init__(self):
                self.start = self.end = None

            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == pl_module.cfg.train.dcg_pretrain_epochs:
                    self.start = (_state(pl_module.model.guidance), _state(pl_module.model.denoiser))

            def on_train_end(self, trainer, pl_module):
                self.end = (_state(pl_module.model.guidance), _state(pl_module.model.denoiser))

        return _Cb()


@pytest.mark.parametrize("joint", [False, True])
def test_frozen_dcg_is_bit_identical_through_the_joint_phase(tmp_path, joint):
    from diffmic.training import api

    cb = Snapshots()
    cfg = DiffMICConfig.from_yaml(None, [*BASE, f"train.joint_train={str(joint).lower()}",
                                         f"train.out_dir={tmp_path}", "train.run_name=r"])
    api.train(cfg, data=_synthetic_bundle(), callbacks=[cb])
    (g0, d0), (g1, d1) = cb.start, cb.end
    assert any(not torch.equal(d0[k], d1[k]) for k in d0)  # the denoiser trained
    dcg_same = all(torch.equal(g0[k], g1[k]) for k in g0)  # weights and BN buffers
    assert dcg_same is (not joint)


def test_stratified_folds_balance_every_class():
    labels = np.array([0] * 10 + [1] * 7 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=0)
    assert set(folds) == {0, 1, 2}
    for c in range(3):
        counts = np.bincount(folds[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
    assert not np.array_equal(folds, stratified_folds(labels, 3, seed=1))


def test_crossfit_no_image_prior_comes_from_a_dcg_that_trained_on_it():
    from diffmic.models import build_model

    cfg = DiffMICConfig.from_yaml(None, BASE)
    data = _synthetic_bundle(n=40)
    images = torch.from_numpy(data.train.images).permute(0, 3, 1, 2)
    labels = torch.from_numpy(data.train.labels).long()
    module = DiffMICModule(cfg.to_dict(), {"num_classes": 3, "in_chans": 3, "image_size": 28})
    fit = crossfit_priors(
        lambda f: build_model(cfg, num_classes=3, in_chans=3, image_size=28).guidance,
        images, labels, folds=4, epochs=2, batch_size=8, eval_batch_size=16,
        inputs=module._inputs, loss_fn=module._aux_loss,
        make_optimizer=lambda dcg: torch.optim.Adam(dcg.parameters(), lr=1e-3), lr_at=lambda e: 1e-3, seed=0,
    )
    assert fit.priors.shape == (40, 3, 3) and fit.folds.shape == (40,)
    torch.testing.assert_close(fit.priors.sum(-1), torch.ones(40, 3))
    for i in range(40):  # the record of what each fold DCG drew in training
        assert i not in set(fit.trained_on[int(fit.folds[i])].tolist())
    for f in range(4):  # fold DCGs train on the other folds' images (drop_last may leave a few out)
        others = set(torch.nonzero(fit.folds != f).squeeze(1).tolist())
        drawn = set(fit.trained_on[f].tolist())
        assert drawn <= others and len(drawn) >= 0.75 * len(others)


def test_crossfit_training_feeds_out_of_fold_priors_and_checkpoints_them(tmp_path, monkeypatch):
    from diffmic.diffusion.schedule import CardSchedule
    from diffmic.training import api

    seen: list[torch.Tensor] = []
    original = CardSchedule.q_sample

    def record(self, y0, prior, t, eps):
        seen.append(prior.detach().clone())
        return original(self, y0, prior, t, eps)

    monkeypatch.setattr(CardSchedule, "q_sample", record)
    cfg = DiffMICConfig.from_yaml(None, [*BASE, "train.crossfit_folds=2", "train.noise_draws=1",
                                         f"train.out_dir={tmp_path}", "train.run_name=r"])
    result = api.train(cfg, data=_synthetic_bundle())
    ckpt = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    oof = ckpt["diffmic_crossfit"]["priors"]  # (N, 3, C)
    assert oof.shape == (48, 3, 3) and seen
    table = {tuple(r) for r in oof.reshape(-1, 3).round(decimals=5).tolist()}
    for prior in seen:  # every prior of the diffusion loss is an out-of-fold row
        assert {tuple(r) for r in prior.round(decimals=5).tolist()} <= table
    assert "diffmic_crossfit" not in torch.load(result.model_path, weights_only=True)["state_dict"]


def test_temper_priors_keeps_the_ranking_and_flattens():
    from diffmic.training.augment import draw_prior_temperatures, temper_priors

    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.05, 0.9, 0.05]])
    torch.testing.assert_close(temper_priors(p, torch.ones(3)), p.clamp_min(1e-12) / p.clamp_min(1e-12).sum(1, True))
    q2, q4 = temper_priors(p, torch.full((3,), 2.0)), temper_priors(p, torch.full((3,), 4.0))
    for q in (q2, q4):
        assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(3))
        assert torch.equal(q.argmax(1), p.argmax(1))
    assert (q4.amax(1) < q2.amax(1)).all() and (q2.amax(1) < p.amax(1)).all()
    # softmax(log p / 2) is sqrt(p) renormalised
    torch.testing.assert_close(q2[0], p[0].sqrt() / p[0].sqrt().sum())
    tau = draw_prior_temperatures(20000, 4.0, generator=torch.Generator().manual_seed(0))
    assert tau.min() >= 1.0 and tau.max() <= 4.0
    assert tau.log().mean().item() == pytest.approx(0.5 * np.log(4.0), abs=0.02)  # log-uniform: mean log = log(4)/2


@pytest.mark.parametrize("temper_max", [1.0, 4.0])
def test_prior_tempering_reaches_the_diffusion_loss_only(tmp_path, monkeypatch, temper_max):
    from diffmic.diffusion.schedule import CardSchedule
    from diffmic.training import api, module

    seen: list[torch.Tensor] = []
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    q_sample, temper = CardSchedule.q_sample, module.temper_priors

    def record_q(self, y0, prior, t, eps):
        seen.append(prior.detach().clone())
        return q_sample(self, y0, prior, t, eps)

    def record_temper(p, tau):
        out = temper(p, tau)
        calls.append((p.detach().clone(), tau.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(CardSchedule, "q_sample", record_q)
    monkeypatch.setattr(module, "temper_priors", record_temper)
    cfg = DiffMICConfig.from_yaml(None, [*BASE, f"train.prior_temper_max={temper_max}", "train.noise_draws=2",
                                         f"train.out_dir={tmp_path}", "train.run_name=r"])
    result = api.train(cfg, data=_synthetic_bundle())
    assert seen and np.isfinite(result.metrics["test"]["diffusion"]["acc"])
    if temper_max == 1.0:
        assert not calls
        return
    assert len(calls) == len(seen)  # every prior of the diffusion loss is tempered, nothing else is
    for i in range(0, len(calls), 3):  # one tau per row, shared by the three streams of a step
        assert all(torch.equal(calls[i][1], calls[j][1]) for j in (i + 1, i + 2))
    for (p, tau, out), prior in zip(calls, seen, strict=True):
        torch.testing.assert_close(prior, out)
        assert tau.min() >= 1.0 and tau.max() <= temper_max and tau.std() > 0
        assert torch.equal(out.argmax(1), p.argmax(1)) and (out.amax(1) <= p.amax(1) + 1e-6).all()


def test_prior_temper_max_config_error():
    from diffmic.errors import ConfigError

    with pytest.raises(ConfigError, match="prior_temper_max must be >= 1"):
        DiffMICConfig.from_yaml(None, [*BASE, "train.prior_temper_max=0.5"])


def test_drop_image_features_replaces_whole_rows_by_ones():
    from diffmic.training.augment import drop_image_features

    feats = torch.randn(4000, 8, requires_grad=True)
    torch.testing.assert_close(drop_image_features(feats, 0.0), feats, rtol=0, atol=0)
    out = drop_image_features(feats, 0.25, generator=torch.Generator().manual_seed(0))
    dropped = (out == 1).all(1)
    assert torch.equal(out[~dropped], feats[~dropped])  # a row is either the image's or all ones
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.02)
    out.sum().backward()
    assert (feats.grad[dropped] == 0).all() and (feats.grad[~dropped] == 1).all()


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_image_dropout_reaches_the_training_loss_only(tmp_path, monkeypatch, p):
    from diffmic.models.denoiser import LabelDenoiser
    from diffmic.training import api

    calls: list[tuple[bool, torch.Tensor]] = []
    denoise = LabelDenoiser.denoise

    def record(self, feats, y_t, prior, t):
        calls.append((torch.is_grad_enabled(), feats.detach().clone()))
        return denoise(self, feats, y_t, prior, t)

    monkeypatch.setattr(LabelDenoiser, "denoise", record)
    cfg = DiffMICConfig.from_yaml(None, [*BASE, f"train.image_dropout={p}", "train.noise_draws=2",
                                         f"train.out_dir={tmp_path}", "train.run_name=r"])
    result = api.train(cfg, data=_synthetic_bundle())
    assert np.isfinite(result.metrics["test"]["diffusion"]["acc"])
    train = [f for grad, f in calls if grad]
    infer = [f for grad, f in calls if not grad]
    assert train and infer
    assert not any((f == 1).all(1).any() for f in infer)  # validation and test always see the image
    dropped = [(f == 1).all(1) for f in train]
    for i in range(0, len(train), 3):  # the three streams of a step see the same features, same rows dropped
        assert all(torch.equal(train[i], train[j]) for j in (i + 1, i + 2))
    rate = torch.cat(dropped).float().mean().item()
    if p == 0.0:
        assert rate == 0.0
    else:
        assert 0.3 < rate < 0.7


def test_image_dropout_config_error():
    from diffmic.errors import ConfigError

    with pytest.raises(ConfigError, match="image_dropout must be in"):
        DiffMICConfig.from_yaml(None, [*BASE, "train.image_dropout=1.0"])


def test_dcg_recipe_schedule_and_joint_rate():
    cfg = DiffMICConfig.from_yaml(None, [*BASE, "train.dcg_pretrain_epochs=4", "train.dcg_lr=1e-3",
                                         "train.dcg_schedule=warmup_cosine", "train.dcg_warmup_epochs=1",
                                         "train.dcg_joint_lr=5e-5"])
    m = DiffMICModule(cfg.to_dict(), {"num_classes": 3, "in_chans": 3, "image_size": 28})
    for e in (0.0, 0.5, 1.0, 2.5, 4.0):
        assert m.dcg_lr_at(e) == pytest.approx(warmup_cosine(e, lr=1e-3, min_lr=0.0, warmup=1.0, total=4.0))
    assert m.dcg_lr_at(1.0) == pytest.approx(1e-3) and m.dcg_lr_at(4.0) == pytest.approx(0.0, abs=1e-12)
    const = DiffMICModule(DiffMICConfig.from_yaml(None, BASE).to_dict(),
                          {"num_classes": 3, "in_chans": 3, "image_size": 28})
    assert const.dcg_lr_at(0.3) == const.cfg.train.dcg_lr == 2e-4  # the original's constant rate



@pytest.mark.train
def test_no_local_branch_trains_and_explains(tmp_path):
    """`model.local_branch=false` (the paper's ablation): the DCG has no local branch, the joint phase
    trains the denoiser on the global prior, and the checkpoint loads and explains without ROI boxes."""
    from diffmic.models import load_model
    from diffmic.training import api

    cfg = DiffMICConfig.from_yaml(None, [*BASE, "model.local_branch=false", f"train.out_dir={tmp_path}",
                                         "train.run_name=nolocal"])
    data = _synthetic_bundle()
    result = api.train(cfg, data=data)
    model = load_model(result.model_path)
    assert model.guidance.local_net is None and model.guidance.mil is None
    assert np.isfinite(result.metrics["test"]["diffusion"]["acc"])
    out = model.explain(data.test.images[0])
    assert out["boxes"] == [] and out["attention"].shape == (0,)


def test_denoiser_encoder_starts_the_joint_phase_as_the_pretrained_dcg_backbone(tmp_path):
    import lightning as L

    from diffmic.training import api

    seen = {}

    class AtFirstJointBatch(L.Callback):  # after the module's on_train_epoch_start hook has run
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == pl_module.cfg.train.dcg_pretrain_epochs and batch_idx == 0:
                dcg = pl_module.model.guidance.global_net.model.state_dict()
                seen["live"] = all(torch.equal(v, pl_module.model.denoiser.encoder.state_dict()[k])
                                   for k, v in dcg.items())
                seen["ema"] = all(torch.equal(v, pl_module.ema.shadow.encoder.state_dict()[k]) for k, v in dcg.items())
                seen["dcg_trained"] = not torch.equal(next(iter(dcg.values())), seen["dcg_at_start"])

        def on_train_start(self, trainer, pl_module):
            first = lambda m: next(iter(m.state_dict().values())).detach().clone()
            seen["dcg_at_start"] = first(pl_module.model.guidance.global_net.model)
            seen["encoder_at_start"] = first(pl_module.model.denoiser.encoder)

    cfg = DiffMICConfig.from_yaml(None, [*BASE, "train.denoiser_encoder_init=dcg", f"train.out_dir={tmp_path}",
                                         "train.run_name=r"])
    api.train(cfg, data=_synthetic_bundle(), callbacks=[AtFirstJointBatch()])
    assert seen["dcg_trained"]  # pre-training changed the DCG, so the copy is not its initialisation
    assert seen["live"] and seen["ema"]
    assert not torch.equal(seen["encoder_at_start"], seen["dcg_at_start"])  # they started different


def test_denoiser_encoder_init_config_errors():
    from diffmic.errors import ConfigError

    with pytest.raises(ConfigError, match="share_encoder"):
        DiffMICConfig.from_yaml(None, [*BASE, "train.denoiser_encoder_init=dcg", "model.share_encoder=true"])
    with pytest.raises(ConfigError, match="must equal model.backbone"):
        DiffMICConfig.from_yaml(None, [*BASE, "train.denoiser_encoder_init=dcg", "model.denoiser_backbone=resnet34"])
    with pytest.raises(ConfigError, match="denoiser_encoder_init"):
        DiffMICConfig.from_yaml(None, [*BASE, "train.denoiser_encoder_init=imagenet"])


class HeadAndStates:
    """Callback: the DCG at the start of the joint phase, the denoiser and the CE head at the end."""

    def __new__(cls):
        import lightning as L

        class _Cb(L.Callback):
            def __init__(self):
                self.dcg_at_joint = self.denoiser_end = self.head_start = self.head_end = None

            def on_train_start(self, trainer, pl_module):
                head = pl_module.denoiser_head
                self.head_start = None if head is None else _state(head)

            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == pl_module.cfg.train.dcg_pretrain_epochs:
                    self.dcg_at_joint = _state(pl_module.model.guidance)

            def on_train_end(self, trainer, pl_module):
                head = pl_module.denoiser_head
                self.denoiser_end = _state(pl_module.model.denoiser)
                self.head_end = None if head is None else _state(head)

        return _Cb()


def _train_with_ce(tmp_path, weight, name):
    from diffmic.training import api

    cb = HeadAndStates()
    cfg = DiffMICConfig.from_yaml(None, [*BASE, f"train.denoiser_ce_weight={weight}", "train.joint_train=false",
                                         f"train.out_dir={tmp_path}", f"train.run_name={name}"])
    result = api.train(cfg, data=_synthetic_bundle(), callbacks=[cb])
    return cb, result


@pytest.mark.train
def test_denoiser_ce_head_trains_the_encoder_without_touching_the_dcg_or_the_shipped_model(tmp_path):
    import csv

    from diffmic.models.checkpoint import load_model

    off, off_result = _train_with_ce(tmp_path, 0.0, "ce0")
    on, on_result = _train_with_ce(tmp_path, 1.0, "ce1")
    assert off.head_start is None
    # The head draws its initial weights off the run's stream: the DCG pre-training is bit-identical.
    assert all(torch.equal(off.dcg_at_joint[k], on.dcg_at_joint[k]) for k in off.dcg_at_joint)
    # The head trained, and its gradient reached the denoiser's encoder (which now ends elsewhere).
    assert any(not torch.equal(on.head_start[k], on.head_end[k]) for k in on.head_start)
    enc = [k for k in off.denoiser_end if k.startswith("encoder.") and off.denoiser_end[k].is_floating_point()]
    assert enc and any(not torch.equal(off.denoiser_end[k], on.denoiser_end[k]) for k in enc)
    # The shipped model has the same parameters either way: the head is training-only.
    assert set(load_model(on_result.model_path).state_dict()) == set(load_model(off_result.model_path).state_dict())
    with open(on_result.run_dir / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/denoiser_ce")]
    assert rows and all(float(r["train/denoiser_ce"]) > 0 for r in rows)
    with open(off_result.run_dir / "logs" / "metrics.csv") as f:
        assert "train/denoiser_ce" not in (csv.DictReader(f).fieldnames or [])


def test_denoiser_ce_weight_config_error():
    from diffmic.errors import ConfigError

    with pytest.raises(ConfigError, match="denoiser_ce_weight must be >= 0"):
        DiffMICConfig.from_yaml(None, [*BASE, "train.denoiser_ce_weight=-0.5"])
    module = DiffMICModule(DiffMICConfig.from_yaml(None, [*BASE, "train.denoiser_ce_weight=0.5"]).to_dict(),
                           {"num_classes": 3, "in_chans": 3, "image_size": 28})
    head = module.denoiser_head
    assert head is not None and (head.in_features, head.out_features) == (64, 3)
    opt_params = {id(p) for g in module.configure_optimizers()[0].param_groups for p in g["params"]}
    assert {id(p) for p in head.parameters()} <= opt_params


@pytest.mark.parametrize("mode", ["fused", "all"])
def test_aux_loss_trains_the_fused_logits_or_all_three(mode):
    from diffmic.models.guidance import GuidanceOutput

    cfg = DiffMICConfig.from_yaml(None, [*BASE, f"train.aux_loss={mode}"])
    module = DiffMICModule(cfg.to_dict(), {"num_classes": 3, "in_chans": 3, "image_size": 28})
    g = torch.Generator().manual_seed(0)
    fused, glob, loc = (torch.randn(5, 3, generator=g) for _ in range(3))
    y = torch.tensor([0, 1, 2, 1, 0])
    guide = GuidanceOutput(logits=fused, logits_global=glob, logits_local=loc, saliency=torch.zeros(5, 3, 4, 4),
                           corners=torch.zeros(5, 0, 2, dtype=torch.long), attention=torch.zeros(5, 0),
                           features=torch.zeros(5, 8))
    ce = torch.nn.functional.cross_entropy
    expected = ce(fused, y) + (ce(glob, y) + ce(loc, y) if mode == "all" else 0.0)
    torch.testing.assert_close(module._aux_loss(guide, y), torch.as_tensor(expected))


def test_prior_temperature_reaches_the_diffusion_in_training_and_validation(tmp_path, monkeypatch):
    """Every prior the diffusion loss and the validation chains see is DiffMIC.diffusion_prior of the DCG's
    softmax (τ = 1, the identity, is tested at the model level); the saved model keeps τ."""
    from diffmic.diffusion.schedule import CardSchedule
    from diffmic.models import DiffMIC
    from diffmic.training import api

    tau = 2.0
    made: list[torch.Tensor] = []
    trained: list[torch.Tensor] = []
    run_with: list[torch.Tensor] = []
    q_sample, diffusion_prior, run_chains = CardSchedule.q_sample, DiffMIC.diffusion_prior, DiffMIC.run_chains

    def record_prior(self, p):
        out = diffusion_prior(self, p)
        torch.testing.assert_close(out, (p.clamp_min(1e-12).log() / tau).softmax(-1))
        made.append(out.detach().clone())
        return out

    def record_q(self, y0, prior, t, eps):
        trained.append(prior.detach().clone())
        return q_sample(self, y0, prior, t, eps)

    def record_chains(self, feats, prior, **kw):
        run_with.append(prior.detach().clone())
        return run_chains(self, feats, prior, **kw)

    monkeypatch.setattr(DiffMIC, "diffusion_prior", record_prior)
    monkeypatch.setattr(CardSchedule, "q_sample", record_q)
    monkeypatch.setattr(DiffMIC, "run_chains", record_chains)
    cfg = DiffMICConfig.from_yaml(None, [*BASE, f"model.prior_temperature={tau}", f"train.out_dir={tmp_path}",
                                         "train.run_name=r"])
    result = api.train(cfg, data=_synthetic_bundle())
    assert trained and run_with and np.isfinite(result.metrics["test"]["diffusion"]["acc"])
    for p in [*trained, *run_with]:  # each one came out of diffusion_prior
        assert any(p.shape == q.shape and torch.equal(p, q) for q in made)
    assert max(float(p.amax()) for p in trained) < 1.0  # a tempered prior is never one-hot
    from diffmic import load_model

    assert load_model(result.model_path).prior_temperature == tau  # the saved model keeps it
