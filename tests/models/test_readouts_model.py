"""DiffMIC's readouts at the model level, ROI saliency and denoiser dropout options."""

from __future__ import annotations

import pytest
import torch

from diffmic.config import DiffMICConfig
from diffmic.errors import ConfigError
from diffmic.models import DiffMIC, build_model

OVERRIDES = [
    "data.path=x",
    "model.backbone=test_resnet",
    "model.denoiser_backbone=test_resnet",
    "model.feature_dim=32",
    "model.denoiser_skip=true",
    "diffusion.timesteps=50",
    "diffusion.sampling_steps=5",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def make(*extra: str, num_classes: int = 3) -> DiffMIC:
    torch.manual_seed(0)
    cfg = DiffMICConfig.from_yaml(None, [*OVERRIDES, *extra])
    return build_model(cfg, num_classes=num_classes, in_chans=3, image_size=28).eval()


def images(n=5):
    return torch.rand(n, 3, 28, 28, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_mean_path_of_an_untrained_skip_model_is_its_prior():
    m = make("eval.readout=mean_path", "eval.temperature=1.0")
    out = m(m.normalize(images()))
    assert out.path is not None and out.y0.shape == (1, 5, 3)
    assert torch.equal(out.path, out.prior)
    torch.testing.assert_close(out.probs, out.prior.softmax(1))


@torch.no_grad()
def test_mean_path_with_samples_keeps_chains_for_uncertainty():
    m = make("eval.readout=mean_path")
    x = m.normalize(images())
    one = m(x)
    many = m(x, samples=4, generator=torch.Generator().manual_seed(0))
    assert many.y0.shape == (4, 5, 3)
    assert torch.equal(many.probs, one.probs)  # the class and probabilities come from the path
    d = m.predict_details(images(), samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d["probs"], one.probs)
    assert not torch.equal(d["interval_low"], d["interval_high"])  # from the 4 chains
    torch.testing.assert_close(d["votes"].sum(1), torch.ones(5))


@torch.no_grad()
def test_readouts_share_chains_and_vote_is_the_majority():
    from diffmic.diffusion.readout import mean_softmax_probs, vote_probs

    m = make("eval.samples=6")
    x = m.normalize(images())
    vote = m(x, samples=6, generator=torch.Generator().manual_seed(3), readout="vote")
    soft = m(x, samples=6, generator=torch.Generator().manual_seed(3), readout="mean_softmax")
    assert torch.equal(vote.y0, soft.y0)
    assert torch.equal(vote.probs, vote_probs(vote.y0, m.temperature))
    assert torch.equal(soft.probs, mean_softmax_probs(soft.y0, m.temperature))


def test_readout_and_options_are_validated():
    for bad in ("eval.readout=median", "model.roi_saliency=max", "model.denoiser_dropout=1.5",
                "train.crossfit_folds=1", "train.dcg_schedule=step"):
        with pytest.raises(ConfigError):
            DiffMICConfig.from_yaml(None, [*OVERRIDES, bad])


@torch.no_grad()
def test_roi_saliency_option_reaches_the_dcg_and_changes_the_crops_of_a_binary_model():
    a = make("model.roi_saliency=class_sum", num_classes=2)
    b = make("model.roi_saliency=top_class", num_classes=2)
    assert a.guidance.roi_saliency == "class_sum" and b.guidance.roi_saliency == "top_class"
    b.load_state_dict(a.state_dict())
    x = a.normalize(torch.rand(8, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
    ga, gb = a.guidance(x), b.guidance(x)
    torch.testing.assert_close(ga.logits_global, gb.logits_global)
    assert not torch.equal(ga.corners, gb.corners)


def test_denoiser_dropout_is_active_in_training_only():
    m = make("model.denoiser_dropout=0.5")
    feats = torch.randn(16, 32)
    y, p, t = torch.randn(16, 3), torch.rand(16, 3), torch.arange(16)
    m.denoiser.eval()
    with torch.no_grad():
        assert torch.equal(m.denoiser.denoise(feats, y, p, t), m.denoiser.denoise(feats, y, p, t))
        torch.nn.init.normal_(m.denoiser.out.weight)  # make the MLP path visible in the output
        m.denoiser.train()
        assert not torch.equal(m.denoiser.denoise(feats, y, p, t), m.denoiser.denoise(feats, y, p, t))


@torch.no_grad()
def test_qmc_chain_noise_reaches_the_chains_on_both_paths():
    m = make("eval.chain_noise=qmc", "eval.readout=mean_path")
    assert m.chain_noise == "qmc"
    x = m.normalize(images())
    guide = m.guidance(x)
    prior = guide.logits.softmax(1)
    feats = m.encode(x, guide)
    alone = m.sample_y0(feats, prior, samples=8, generator=torch.Generator().manual_seed(4))
    with_path, path = m.run_chains(feats, prior, samples=8, path=True, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(with_path, alone)  # the chains riding with the mean path draw the same noise
    assert torch.equal(path, prior)
    # the untrained skip denoiser maps the start linearly, y_0 = ŷ + k·z: the same offsets for every image
    off = alone - prior
    torch.testing.assert_close(off, off[:, :1].expand_as(off), rtol=1e-4, atol=1e-5)
    rnd = make("eval.readout=mean_path").sample_y0(feats, prior, samples=8, generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(rnd - prior, (rnd - prior)[:, :1].expand_as(rnd))  # i.i.d. draws differ per image
    with pytest.raises(ConfigError):
        DiffMICConfig.from_yaml(None, [*OVERRIDES, "eval.chain_noise=sobol"])


@torch.no_grad()
def test_qmc_chain_noise_with_eta_and_other_samplers():
    m = make("eval.chain_noise=qmc", "diffusion.eta=0.5")
    x = m.normalize(images())
    guide = m.guidance(x)
    prior = guide.logits.softmax(1)
    feats = m.encode(x, guide)
    a = m.sample_y0(feats, prior, samples=4, generator=torch.Generator().manual_seed(1))
    b = m.sample_y0(feats, prior, samples=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 5, 3)  # QMC start, per-step noise from the same generator
    # a call-time override to a sampler that draws noise every step runs with random noise
    anc = m.sample_y0(feats, prior, samples=2, sampler="truncated", num_steps=5,
                      generator=torch.Generator().manual_seed(1))
    assert anc.shape == (2, 5, 3) and torch.isfinite(anc).all()
    with pytest.raises(ConfigError, match="chain_noise"):
        DiffMICConfig.from_yaml(None, [*OVERRIDES, "eval.chain_noise=qmc", "diffusion.sampler=truncated"])
    with pytest.raises(ValueError, match="chain_noise"):
        DiffMIC(m.guidance, m.denoiser, m.schedule, class_names=["a", "b", "c"], image_size=28, in_chans=3,
                mean=[0.5], std=[0.5], chain_noise="sobol")


@torch.no_grad()
def test_prior_temperature_moves_the_diffusion_prior_only():
    """model.prior_temperature: the mean path of an untrained skip model returns softmax(logits / τ),
    the reported prior stays the DCG's own softmax(logits), and τ = 1 is the identity."""
    x = images()
    one, two = make("eval.readout=mean_path"), make("eval.readout=mean_path", "model.prior_temperature=2")
    assert one.prior_temperature == 1.0 and two.prior_temperature == 2.0
    p = one.guidance(one.normalize(x)).logits.softmax(1)
    assert one.diffusion_prior(p) is p
    out1, out2 = one(one.normalize(x)), two(two.normalize(x))
    torch.testing.assert_close(out2.prior, out1.prior)  # same weights (seeded): the same DCG prior
    logits = two.guidance(two.normalize(x)).logits
    torch.testing.assert_close(out2.path, (logits / 2).softmax(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out1.path, out1.prior)
    assert torch.equal(out2.path.argmax(1), out2.prior.argmax(1))
    assert (out2.path.amax(1) < out2.prior.amax(1)).all()  # flatter: τ > 1
    # the chains run on the same prior (one batch with the path when both are asked for)
    many = two(two.normalize(x), samples=3, generator=torch.Generator().manual_seed(0))
    assert many.y0.shape == (3, 5, 3)


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan"])
def test_prior_temperature_config_error(bad):
    with pytest.raises(ConfigError, match="model.prior_temperature must be a finite number > 0"):
        DiffMICConfig.from_yaml(None, [*OVERRIDES, f"model.prior_temperature={bad}"])
