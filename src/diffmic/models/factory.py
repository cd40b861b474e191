"""``build_model``: the one place in ``models`` that reads the config tree."""

from __future__ import annotations

from diffmic.config import DiffMICConfig
from diffmic.diffusion.schedule import CardSchedule
from diffmic.images import ImageSpec
from diffmic.models.backbones import create_backbone, small_input_default
from diffmic.models.denoiser import LabelDenoiser, mmse_skip_init
from diffmic.models.diffmic import DiffMIC
from diffmic.models.guidance import DCG


def build_model(
    cfg: DiffMICConfig,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int,
    class_names: list[str] | None = None,
    image_spec: ImageSpec | dict | None = None,
) -> DiffMIC:
    """Build a :class:`DiffMIC` from a resolved config and the data's shape.

    ``image_spec`` (a checkpoint's, or its ``to_dict()`` as :meth:`DiffMIC.model_args` gives it)
    defaults to the one the data readers use: ``image_size``, ``in_chans``, ``data.mean``/``data.std``,
    centre crop decided by ``data.format``.
    """
    if isinstance(image_spec, dict):
        image_spec = ImageSpec.from_dict(image_spec)
    m, d = cfg.model, cfg.diffusion
    small = m.small_input if m.small_input is not None else small_input_default(image_size)
    guidance = DCG(
        num_classes,
        in_chans=in_chans,
        image_size=image_size,
        backbone=m.backbone,
        local_backbone=m.local_backbone,
        pretrained=m.pretrained,
        small_input=small,
        cam_size=m.cam_size,
        num_crops=m.num_crops,
        crop_size=m.crop_size,
        top_t=m.top_t,
        mil_hidden=m.mil_hidden,
        roi_saliency=m.roi_saliency,
        local_branch=m.local_branch,
        global_weight=m.global_weight,
    )
    if m.share_encoder:
        encoder, encoder_dim = None, guidance.feature_dim
    else:
        encoder, encoder_dim = create_backbone(
            m.denoiser_backbone, in_chans=in_chans, pretrained=m.pretrained, small_input=small, pooled=True
        )
    schedule = CardSchedule(d.timesteps, d.schedule, d.beta_start, d.beta_end)
    skip_init = mmse_skip_init(schedule.alphas_cumprod, num_classes) if m.denoiser_skip else None
    denoiser = LabelDenoiser(
        num_classes,
        feature_dim=m.feature_dim,
        num_timesteps=d.timesteps,
        encoder=encoder,
        encoder_dim=encoder_dim,
        skip_init=skip_init,
        dropout=m.denoiser_dropout,
    )
    model = DiffMIC(
        guidance,
        denoiser,
        schedule,
        class_names=class_names or [str(i) for i in range(num_classes)],
        image_size=image_size,
        in_chans=in_chans,
        mean=cfg.data.mean,
        std=cfg.data.std,
        sampler=d.sampler,
        sampling_steps=d.sampling_steps,
        eta=d.eta,
        temperature=cfg.eval.temperature,
        share_encoder=m.share_encoder,
        prior_temperature=m.prior_temperature,
        readout=cfg.eval.readout,
        chain_noise=cfg.eval.chain_noise,
        config=cfg.to_dict(),
        image_spec=image_spec or ImageSpec.for_format(
            cfg.data.format, size=image_size, channels=in_chans, mean=cfg.data.mean, std=cfg.data.std
        ),
    )
    return model
