"""DiffMIC: composes the DCG guidance network, the label denoiser and the diffusion schedule.

Inference: the DCG gives the prior ŷ = softmax(½(g + l)); the image embedding is computed once;
``samples`` reverse chains (DDIM on the residual by default) are run from N(ŷ, I) in one batch, and
the deterministic mean path (DDIM η = 0 from ŷ itself) when the readout needs it; a readout
(:mod:`diffmic.diffusion.readout`) turns them into class probabilities.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmic.diffusion.readout import mean_softmax_probs, readout_probs, temper_priors
from diffmic.diffusion.sampling import CHAIN_NOISES, chain_start_noise, sample, sample_ddim, sample_mean_path
from diffmic.diffusion.schedule import CardSchedule
from diffmic.errors import DataError
from diffmic.images import ImageSpec, to_batch, to_model_input
from diffmic.models.backbones import fuse_conv_bn
from diffmic.models.denoiser import LabelDenoiser, fuse_linear_bn
from diffmic.models.guidance import DCG, GuidanceOutput
from diffmic.models.modes import eval_mode


class Prediction(NamedTuple):
    """Inference outputs for a batch."""

    probs: Tensor  # diffusion class probabilities of the readout, (B, C)
    y0: Tensor  # sampled y_0 vectors, (S, B, C) (the mean path as S = 1 when no chain was sampled)
    prior: Tensor  # DCG fused prior softmax(½(g + l)), (B, C); the diffusion's is DiffMIC.diffusion_prior(prior)
    guidance: GuidanceOutput
    path: Tensor | None = None  # y_0 of the deterministic mean path, (B, C), when it was run


probs_from_y0 = mean_softmax_probs  # (S, B, C) -> (B, C): mean over S of softmax(y_0 / temperature)


class _ChannelsLast(nn.Module):
    """Run ``net`` on a channels-last copy of its input (inference copies only)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last))


class DiffMIC(nn.Module):
    """The full model. Build it with :func:`diffmic.models.factory.build_model` or load a checkpoint
    with :func:`diffmic.load_model` (:mod:`diffmic.models.checkpoint`).

    Args:
        guidance: the DCG.
        denoiser: the label denoiser.
        schedule: the CARD schedule.
        class_names: names of the C classes.
        image_size: square input side the model was trained at.
        in_chans: input channels.
        mean: per-channel normalisation mean (length 1 or ``in_chans``), in [0, 1] units.
        std: per-channel normalisation std.
        sampler: default sampler name (``ddim`` | ``ancestral`` | ``truncated``).
        sampling_steps: default number of denoiser calls per chain.
        eta: DDIM stochasticity.
        temperature: softmax temperature turning y_0 into probabilities.
        share_encoder: the denoiser embeds the DCG's pooled global features instead of the image.
        prior_temperature: τ of the diffusion's prior softmax(DCG logits / τ) (:meth:`diffusion_prior`);
            1 conditions the diffusion on the DCG's prior itself, as the original.
        readout: ``mean_path`` | ``vote`` | ``mean_softmax`` (:mod:`diffmic.diffusion.readout`).
        chain_noise: starting noise of the DDIM chains, ``random`` or ``qmc``
            (:func:`~diffmic.diffusion.sampling.chain_start_noise`); the other samplers draw theirs at random.
        config: the resolved config the model was built from (``DiffMICConfig.to_dict()``), stored
            in checkpoints.
        image_spec: the preprocessing (:class:`~diffmic.images.ImageSpec`) every input goes through;
            None: ``image_size``, ``in_chans``, ``mean``, ``std`` and no centre crop. Stored in
            checkpoints; when given it must agree with those four arguments.
    """

    def __init__(
        self,
        guidance: DCG,
        denoiser: LabelDenoiser,
        schedule: CardSchedule,
        *,
        class_names: list[str],
        image_size: int,
        in_chans: int,
        mean: list[float],
        std: list[float],
        sampler: str = "ddim",
        sampling_steps: int = 10,
        eta: float = 0.0,
        temperature: float = 0.1,
        share_encoder: bool = False,
        prior_temperature: float = 1.0,
        readout: str = "mean_softmax",
        chain_noise: str = "random",
        config: dict[str, Any] | None = None,
        image_spec: ImageSpec | None = None,
    ) -> None:
        super().__init__()
        self.guidance = guidance
        self.denoiser = denoiser
        self.schedule = schedule
        self.class_names = list(class_names)
        self.image_size = image_size
        self.in_chans = in_chans
        self.sampler = sampler
        self.sampling_steps = sampling_steps
        self.eta = eta
        self.temperature = temperature
        self.share_encoder = share_encoder
        if not prior_temperature > 0:
            raise ValueError(f"prior_temperature must be > 0, got {prior_temperature}")
        self.prior_temperature = float(prior_temperature)
        self.readout = readout
        if chain_noise not in CHAIN_NOISES:
            raise ValueError(f"chain_noise must be one of {list(CHAIN_NOISES)}, got {chain_noise!r}")
        self.chain_noise = chain_noise
        spec = ImageSpec(image_size, in_chans, False, tuple(mean), tuple(std))
        if image_spec is not None and (image_spec.size, image_spec.channels, image_spec.mean, image_spec.std) != (
            spec.size, spec.channels, spec.mean, spec.std
        ):
            raise ValueError(f"image_spec {image_spec} disagrees with image_size/in_chans/mean/std {spec}")
        self.image_spec = image_spec or spec
        m = torch.tensor(mean, dtype=torch.float32).expand(in_chans).reshape(1, in_chans, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).expand(in_chans).reshape(1, in_chans, 1, 1)
        self.register_buffer("mean", m.clone(), persistent=False)
        self.register_buffer("std", s.clone(), persistent=False)
        self.config: dict[str, Any] = dict(config or {})  # resolved config, stored in checkpoints

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ------------------------------------------------------------ building blocks
    def normalize(self, x01: Tensor) -> Tensor:
        """Images in [0, 1] (B, C, H, W) -> normalised network input."""
        return (x01 - self.mean) / self.std

    def diffusion_prior(self, prior: Tensor) -> Tensor:
        """The DCG's prior probabilities (..., C) -> the prior the diffusion conditions on and starts from.

        :func:`~diffmic.diffusion.readout.temper_priors` with τ = ``prior_temperature``, i.e.
        softmax(logits / τ) of the DCG's logits; τ = 1 returns ``prior`` itself. :meth:`run_chains`,
        :meth:`sample_y0` and :meth:`mean_path` take this prior, and training uses the same map.
        """
        if self.prior_temperature == 1.0:
            return prior
        return temper_priors(prior, self.prior_temperature)

    def encode(self, x: Tensor, guide: GuidanceOutput) -> Tensor:
        """Denoiser image embedding (B, F), computed once per image."""
        if self.share_encoder:
            return self.denoiser.encode(guide.features.detach())
        return self.denoiser.encode(x)

    def sample_y0(
        self,
        feats: Tensor,
        prior: Tensor,
        *,
        samples: int = 1,
        sampler: str | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run ``samples`` reverse chains per image as one batch: returns y_0 (S, B, C)."""
        b = prior.shape[0]
        feats_s = feats.repeat(samples, 1)  # (S*B, F): chain s of image i is row s*B + i
        prior_s = prior.repeat(samples, 1)

        def denoise_fn(y_t: Tensor, t: Tensor) -> Tensor:
            return self.denoiser.denoise(feats_s, y_t, prior_s, t)

        if (sampler or self.sampler) == "ddim":  # the start noise of the model's kind (random: sample_ddim's own draw)
            noise = chain_start_noise(samples, b, prior.shape[1], kind=self.chain_noise, generator=generator,
                                      device=prior.device, dtype=prior.dtype)
            y0 = sample_ddim(self.schedule, denoise_fn, prior_s, num_steps or self.sampling_steps,
                             eta=self.eta if eta is None else eta, generator=generator, noise=noise)
            return y0.view(samples, b, -1)
        y0 = sample(
            self.schedule,
            denoise_fn,
            prior_s,
            sampler=sampler or self.sampler,
            num_steps=num_steps or self.sampling_steps,
            eta=self.eta if eta is None else eta,
            generator=generator,
        )
        return y0.view(samples, b, -1)

    def mean_path(self, feats: Tensor, prior: Tensor, *, num_steps: int | None = None) -> Tensor:
        """y_0 (B, C) of the deterministic mean path (DDIM, η = 0, started at the prior)."""
        return sample_mean_path(
            self.schedule,
            lambda y_t, t: self.denoiser.denoise(feats, y_t, prior, t),
            prior,
            num_steps or self.sampling_steps,
        )

    def run_chains(
        self,
        feats: Tensor,
        prior: Tensor,
        *,
        samples: int = 1,
        path: bool = False,
        chains: bool = True,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """(chains (S, B, C) or None, mean path (B, C) or None) from features computed once.

        When both are wanted, the sampler is DDIM with η = 0 and the denoiser is in eval mode, the
        mean path rides along as S + 1-th chain with zero noise: one MLP call per step for all of
        them (the same numbers as two separate runs; the chains draw the same noise).
        """
        steps = num_steps or self.sampling_steps
        if chains and path and (sampler or self.sampler) == "ddim" and self.eta == 0 and not self.denoiser.training:
            b, c = prior.shape
            noise = chain_start_noise(samples, b, c, kind=self.chain_noise, generator=generator, device=prior.device,
                                      dtype=prior.dtype)  # random: exactly what sample_ddim draws for the chains
            feats_all, prior_all = feats.repeat(samples + 1, 1), prior.repeat(samples + 1, 1)
            y0 = sample_ddim(
                self.schedule,
                lambda y_t, t: self.denoiser.denoise(feats_all, y_t, prior_all, t),
                prior_all,
                steps,
                eta=0.0,
                noise=torch.cat([noise, torch.zeros_like(prior)]),
            )
            return y0[: samples * b].view(samples, b, -1), y0[samples * b:]
        ys = self.sample_y0(feats, prior, samples=samples, generator=generator, sampler=sampler,
                            num_steps=num_steps) if chains else None
        yp = self.mean_path(feats, prior, num_steps=num_steps) if path else None
        return ys, yp

    def forward(
        self,
        x: Tensor,
        *,
        samples: int = 1,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        readout: str | None = None,
    ) -> Prediction:
        """Inference on normalised images (B, C_in, H, W).

        The ``mean_path`` readout runs the deterministic path and, when ``samples > 1``, also the
        ``samples`` stochastic chains (for the uncertainty columns); the other readouts run chains.
        """
        readout = readout or self.readout
        guide = self.guidance(x)
        prior = guide.logits.softmax(dim=1)
        feats = self.encode(x, guide)
        on_path = readout == "mean_path"
        chains, path = self.run_chains(
            feats, self.diffusion_prior(prior), samples=samples, path=on_path, chains=not on_path or samples > 1,
            generator=generator, sampler=sampler, num_steps=num_steps,
        )
        probs = readout_probs(readout, temperature=self.temperature, chains=chains, path=path)
        y0 = chains if chains is not None else path.unsqueeze(0)  # type: ignore[union-attr]
        return Prediction(probs, y0, prior, guide, path)

    # ------------------------------------------------------------- inference copy
    inference_only: bool = False  # True on the copies made by fuse_for_inference

    def train(self, mode: bool = True) -> DiffMIC:
        if mode and self.inference_only:
            raise RuntimeError("this DiffMIC is an inference-only copy (fuse_for_inference: BatchNorm is folded "
                               "into the weights); train the model it was made from")
        return super().train(mode)

    def fuse_for_inference(self, *, channels_last: bool | None = None, check: bool = True,
                           inplace: bool = False) -> DiffMIC:
        """An inference-only copy with every BatchNorm folded into the layer before it.

        The backbones' ``Conv2d`` + ``BatchNorm2d`` pairs (:func:`~diffmic.models.backbones.fuse_conv_bn`)
        and the denoiser's ``proj`` + ``norm0`` become single layers with the running statistics
        frozen into their weights, so an eval-mode forward pass computes the same function with
        fewer kernels. ``self`` is not changed: training goes on with it. The copy is in eval mode,
        refuses ``train()`` and :func:`~diffmic.models.checkpoint.save_model`, and carries no
        gradients.

        Args:
            channels_last: also store the convolution weights in ``torch.channels_last`` and feed
                the backbones channels-last inputs; None: only above 64 px (measured about 5% less
                CPU time at 224 px on top of the folding, no clear gain at 28 px; docs/speed.md).
            check: compare every folded backbone with its original on a random batch and keep the
                original where they differ by more than 1e-4 relative (a backbone whose
                ``forward`` does not apply ``bnN`` right after ``convN``).
            inplace: fold into ``self`` and return it instead of a copy (half the peak memory, for a
                model loaded only to predict: ``diffmic predict`` does this); ``self`` becomes the
                inference-only model.
        """
        if channels_last is None:
            channels_last = self.image_size > 64
        fused = (self if inplace else copy.deepcopy(self)).eval().requires_grad_(False)
        nets = [(fused.guidance, "global_net", self.image_size)]
        if fused.guidance.local_net is not None:  # None without the local branch (model.local_branch=false)
            nets.append((fused.guidance, "local_net", fused.guidance.crop_size))
        if fused.denoiser.encoder is not None:
            nets.append((fused.denoiser, "encoder", self.image_size))
        gen = torch.Generator().manual_seed(0)
        for holder, attr, size in nets:
            original = getattr(holder, attr)
            net = copy.deepcopy(original)
            fuse_conv_bn(net)
            if channels_last:
                net = _ChannelsLast(net.to(memory_format=torch.channels_last))
            if check:
                x = torch.randn(2, self.in_chans, size, size, generator=gen).to(self.mean.device)
                with torch.inference_mode():
                    ref, out = original(x), net(x)
                if not (out - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max())):
                    net = original
            setattr(holder, attr, net)
        d = fused.denoiser
        if isinstance(d.norm0, nn.BatchNorm1d):
            d.proj, d.norm0 = fuse_linear_bn(d.proj, d.norm0), nn.Identity()
        fused.inference_only = True
        return fused

    # ------------------------------------------------------------------ user API
    def preprocess(self, images: Any) -> Tensor:
        """Images (tensor, numpy array, PIL image, or a list of them) -> normalised (N, C, H, W).

        The training path, by :attr:`image_spec` (see :mod:`diffmic.images`): PIL images and
        uint16 arrays become the uint8 array a dataset reader stores (EXIF orientation, 16-bit
        ÷ 257, centre crop if the spec says so, channel conversion, PIL bilinear resize); uint8 is
        scaled by 1/255; float inputs must already be in [0, 1]. Arrays are (H, W), (H, W, C) or
        (N, H, W, C); tensors are (C, H, W) or (N, C, H, W).
        """
        return to_model_input(to_batch(images, self.image_spec).to(self.mean.device), self.image_spec)

    @torch.inference_mode()
    def predict_proba(
        self,
        images: Any,
        *,
        samples: int = 1,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
    ) -> Tensor:
        """Class probabilities (N, C) from the diffusion output, in eval mode."""
        with eval_mode(self):
            x = self.preprocess(images)
            out = [self(chunk, samples=samples, generator=generator).probs for chunk in x.split(batch_size)]
        return torch.cat(out)

    @torch.inference_mode()
    def predict(self, images: Any, **kwargs: Any) -> Tensor:
        """Predicted class indices (N,)."""
        return self.predict_proba(images, **kwargs).argmax(dim=1)

    @torch.inference_mode()
    def predict_details(
        self,
        images: Any,
        *,
        samples: int = 1,
        generator: torch.Generator | None = None,
        batch_size: int = 256,
        level: float = 0.95,
    ) -> dict[str, Tensor]:
        """Probabilities with per-image uncertainty, in eval mode.

        Returns a dict of tensors: ``probs`` (N, C) diffusion probabilities, ``prior`` (N, C) DCG
        prior, ``votes`` (N, C) fraction of the ``samples`` chains whose argmax is each class,
        ``entropy`` (N,) predictive entropy of ``probs`` in nats, ``interval_low`` /
        ``interval_high`` (N, C) per-class percentile interval of the sampled y_0 values
        (2.5/97.5 % at ``level=0.95``; both equal y_0 when ``samples=1``).
        """
        from diffmic.diffusion.uncertainty import (
            class_intervals,
            predictive_entropy,
            vote_fractions,
        )

        parts: dict[str, list[Tensor]] = {k: [] for k in
                                          ("probs", "prior", "votes", "entropy", "interval_low", "interval_high")}
        with eval_mode(self):
            x = self.preprocess(images)
            for chunk in x.split(batch_size):
                out = self(chunk, samples=samples, generator=generator)
                low, high = class_intervals(out.y0, level)
                parts["probs"].append(out.probs)
                parts["prior"].append(out.prior)
                parts["votes"].append(vote_fractions(out.y0))
                parts["entropy"].append(predictive_entropy(out.probs))
                parts["interval_low"].append(low)
                parts["interval_high"].append(high)
        return {k: torch.cat(v) for k, v in parts.items()}

    @torch.inference_mode()
    def explain(
        self,
        image: Any,
        *,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """What the model looked at for one image (eval mode).

        Returns a dict:
            ``saliency``: per-class CAM (raw logits) bilinearly upsampled to the model input,
            numpy (C, H, W) with H = W = ``image_size``;
            ``boxes``: the K ROI crops as ``(row, col, height, width)`` in model-input pixels;
            ``attention``: numpy (K,) MIL attention weight of each crop (sums to 1);
            ``prior``: numpy (C,) DCG prior; ``probs``: numpy (C,) diffusion probabilities;
            ``prediction``: argmax of ``probs``; ``class_names``; ``image_size``.
        """
        with eval_mode(self):
            x = self.preprocess(image)
            if x.shape[0] != 1:
                raise DataError(f"explain takes one image, got a batch of {x.shape[0]}")
            out = self(x, samples=samples, generator=generator)
        size = (x.shape[2], x.shape[3])
        sal = F.interpolate(out.guidance.saliency.float(), size=size, mode="bilinear", align_corners=False)
        crop = self.guidance.crop_size
        boxes = [(int(r), int(c), crop, crop) for r, c in out.guidance.corners[0].tolist()]
        probs = out.probs[0].float().cpu().numpy()
        return {
            "saliency": sal[0].cpu().numpy(),
            "boxes": boxes,
            "attention": out.guidance.attention[0].float().cpu().numpy(),
            "prior": out.prior[0].float().cpu().numpy(),
            "probs": probs,
            "prediction": int(probs.argmax()),
            "class_names": list(self.class_names),
            "image_size": size,
        }

    # --------------------------------------------------------------- persistence
    def model_args(self) -> dict[str, Any]:
        """What the data decided, stored in checkpoints beside the config (``build_model`` keywords).

        Saving and loading live in :mod:`diffmic.models.checkpoint`.
        """
        return {
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "image_spec": self.image_spec.to_dict(),
        }
