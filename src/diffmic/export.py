"""ONNX export of the DiffMIC inference graph (deterministic DDIM, the starting noise is an input).

The exported graph is :class:`DiffMICInference`: images in [0, 1] -> normalisation -> DCG (global
branch, greedy ROI crops, local branch, gated-attention MIL) -> prior ŷ -> denoiser image embedding
(once) -> ``num_steps`` DDIM steps with η = 0 on ``samples`` chains per image, started from the
``noise`` input -> probabilities. PyTorch runs the same module, which is what the parity check and
the tests compare against. See docs/export.md for what is and is not exported.

Uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``); it needs the
``onnx`` and ``onnxscript`` packages, and the check after export needs ``onnxruntime``
(``pip install 'diffmic[export]'``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from diffmic._io import atomic_path, check_output_file
from diffmic.diffusion.readout import mean_softmax_probs, vote_probs
from diffmic.diffusion.sampling import ddim_timesteps, sample_ddim
from diffmic.errors import ConfigError, DiffMICError, ExportError, first_line
from diffmic.models.diffmic import DiffMIC
from diffmic.models.modes import eval_mode

INSTALL_HINT = "pip install 'diffmic[export]'"
INPUT_NAMES = ("images", "noise")
OUTPUT_NAMES = ("probs", "prior", "y0")
DEFAULT_OPSET = 18
CHECK_TOLERANCE = 1e-3  # max |Δ| of probs / prior between onnxruntime and PyTorch after export
_MAX_BYTES = 1_900_000_000  # one protobuf file holds < 2 GiB; external-data files are not written


class DiffMICInference(nn.Module):
    """The deterministic inference graph that is exported: ``(images, noise) -> (probs, prior, y0)``.

    Args:
        model: a :class:`DiffMIC` (put it in eval mode; :func:`export_onnx` does).
        num_steps: DDIM steps (denoiser calls per chain); None: ``model.sampling_steps``.

    Inputs:
        images: float (B, in_chans, image_size, image_size) in [0, 1], i.e. what
            :meth:`DiffMIC.preprocess` produces before normalisation (uint8 pixels / 255).
        noise: float (S, B, C) standard normal starting noise, chain s of image i at ``[s, i]``.

    Outputs:
        probs (B, C): the checkpoint's readout: mean over the S chains of softmax(y_0 / temperature)
            (``mean_softmax``; also ``mean_path`` when ``noise`` is zeros with S = 1, the
            deterministic path), or the majority vote (``vote``);
        prior (B, C): the DCG prior softmax(½(g + l)); y0 (S, B, C): the sampled y_0.

    With the checkpoint's DDIM sampler at η = 0, ``model(model.normalize(images), samples=S,
    generator=g)`` gives the same probabilities as this module with
    ``noise = torch.randn(S * B, C, generator=g').view(S, B, C)`` where ``g'`` has ``g``'s seed.
    """

    def __init__(self, model: DiffMIC, num_steps: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.num_steps = int(model.sampling_steps if num_steps is None else num_steps)
        ddim_timesteps(model.schedule.num_timesteps, self.num_steps)  # ConfigError if out of range

    def forward(self, images: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = self.model
        x = m.normalize(images)
        guide = m.guidance(x)
        prior = guide.logits.softmax(dim=1)
        feats = m.encode(x, guide)
        s, b, c = noise.shape
        # As DiffMIC.sample_y0: the S chains run as one batch, chain s of image i is row s*B + i.
        feats_s = feats.repeat(s, 1)
        prior_s = m.diffusion_prior(prior).repeat(s, 1)

        def denoise_fn(y_t: Tensor, t: Tensor) -> Tensor:
            return m.denoiser.denoise(feats_s, y_t, prior_s, t)

        y0 = sample_ddim(m.schedule, denoise_fn, prior_s, self.num_steps, eta=0.0,
                         noise=noise.reshape(s * b, c))
        y0 = y0.reshape(s, b, c)
        # vote: majority over the S chains; mean_path (noise = zeros, S = 1) and mean_softmax:
        # mean over the chains of softmax(y_0 / T), which for the mean path is softmax(y_0 / T).
        read = vote_probs if m.readout == "vote" else mean_softmax_probs
        return read(y0, m.temperature), prior, y0


def _require(*modules: str) -> None:
    """Import the export packages, or raise one ExportError naming the missing ones."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs the {', '.join(missing)} package(s): {INSTALL_HINT}")


def _check_destination(path: Path) -> None:
    check_output_file(path, ExportError)


def _metadata(model: DiffMIC, samples: int, num_steps: int, batch_size: int | None) -> dict[str, str]:
    """Everything a runtime needs to feed the graph, stored as ONNX metadata_props (strings)."""
    return {
        "diffmic.format": "diffmic-onnx",
        "diffmic.version": "1",
        "diffmic.class_names": json.dumps(model.class_names),
        "diffmic.image_size": str(model.image_size),
        "diffmic.in_chans": str(model.in_chans),
        "diffmic.input_range": "float32 [0, 1] (uint8 / 255), NCHW; normalisation is in the graph",
        "diffmic.mean": json.dumps(model.mean.flatten().tolist()),
        "diffmic.std": json.dumps(model.std.flatten().tolist()),
        "diffmic.image_spec": model.image_spec.to_json(),
        "diffmic.samples": str(samples),
        "diffmic.sampler": "ddim",
        "diffmic.num_steps": str(num_steps),
        "diffmic.eta": "0",
        "diffmic.temperature": repr(float(model.temperature)),
        "diffmic.readout": model.readout,
        "diffmic.chain_noise": model.chain_noise,
        "diffmic.batch_size": "dynamic" if batch_size is None else str(batch_size),
    }


def _example_inputs(model: DiffMIC, samples: int, batch: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    device = model.mean.device
    images = torch.rand(batch, model.in_chans, model.image_size, model.image_size, generator=g)
    noise = torch.randn(samples, batch, model.num_classes, generator=g)
    return images.to(device), noise.to(device)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _verify(path: Path, wrapper: DiffMICInference, checks: list[tuple[Tensor, Tensor]], tol: float) -> None:
    """Run the written file in onnxruntime and compare with PyTorch; ExportError on a mismatch."""
    try:
        sess = _session(path)
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the exported graph ({first_line(exc)})") from exc
    for images, noise in checks:
        with torch.no_grad():
            ref = wrapper(images, noise)
        try:
            out = sess.run(list(OUTPUT_NAMES), {"images": images.cpu().numpy(), "noise": noise.cpu().numpy()})
        except Exception as exc:
            raise ExportError(
                f"onnxruntime cannot run the exported graph at batch {images.shape[0]} ({first_line(exc)})"
            ) from exc
        for name, o, r in zip(OUTPUT_NAMES[:2], out[:2], ref[:2], strict=True):
            diff = float((torch.from_numpy(o) - r.cpu()).abs().max())
            if not diff <= tol:  # also catches NaN
                raise ExportError(
                    f"onnxruntime and PyTorch disagree on {name} at batch {images.shape[0]} "
                    f"(max abs diff {diff:.3g} > {tol:g}); nothing was written"
                )


def export_onnx(
    model: DiffMIC,
    path: str | Path,
    *,
    samples: int = 1,
    num_steps: int | None = None,
    batch_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    tolerance: float = CHECK_TOLERANCE,
) -> Path:
    """Export ``model``'s inference graph (:class:`DiffMICInference`) to an ONNX file.

    Args:
        model: the model (any mode and device; it is exported in eval mode and left as it was).
        path: the ``.onnx`` file to write. It is written atomically: a temporary file in the same
            folder renamed at the end, so a failure never leaves a partial file.
        samples: S, reverse chains per image (fixed in the graph: ``noise`` is (S, B, C)).
        num_steps: DDIM steps; None: the checkpoint's ``diffusion.sampling_steps``. The sampler is
            always DDIM with η = 0, whatever the checkpoint's default sampler is.
        batch_size: None for a dynamic batch axis, or a fixed batch size.
        opset: ONNX opset version (the exporter's native opset is 18).
        check: run the written graph in onnxruntime on random inputs (two batch sizes when the
            batch is dynamic) and compare probs and prior with PyTorch before keeping the file.
        tolerance: max abs difference allowed by ``check``.

    Returns:
        The path written.

    Raises:
        ExportError: missing export packages, an unwritable path, a failed export or check.
        ConfigError: invalid ``samples``, ``num_steps`` or ``batch_size``.
    """
    path = Path(path)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples must be an integer >= 1, got {samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be an integer >= 1 or None (dynamic), got {batch_size!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)):
        raise ConfigError(f"num_steps must be an integer, got {num_steps!r}")
    _check_destination(path)
    _require("onnx", "onnxscript", *(["onnxruntime"] if check else []))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size > _MAX_BYTES:
        raise ExportError(f"model weights ({size / 1e9:.1f} GB) exceed the 2 GB limit of one ONNX file")

    wrapper = DiffMICInference(model, num_steps)
    steps = wrapper.num_steps
    example_batch = batch_size or 2  # a dynamic dimension cannot be traced at size 0 or 1
    images, noise = _example_inputs(model, samples, example_batch, seed=0)
    dynamic_shapes = None
    if batch_size is None:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = {"images": {0: batch}, "noise": {1: batch}}

    log_disabled = logging.root.manager.disable
    try:
        # The exporter prints progress, logs its graph rewrites at INFO and raises many harmless
        # warnings: silence them so the CLI prints one line.
        logging.disable(logging.INFO)
        with eval_mode(model), atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    wrapper,
                    (images, noise),
                    dynamo=True,
                    input_names=list(INPUT_NAMES),
                    output_names=list(OUTPUT_NAMES),
                    opset_version=opset,
                    dynamic_shapes=dynamic_shapes,
                    optimize=True,
                    verbose=False,
                    report=False,
                )
            except DiffMICError:
                raise
            except Exception as exc:
                raise ExportError(f"ONNX export failed ({first_line(exc)})") from exc
            program.model.metadata_props.update(_metadata(model, samples, steps, batch_size))
            program.model.doc_string = (
                f"DiffMIC: images in [0, 1] (B, {model.in_chans}, {model.image_size}, {model.image_size}) and "
                f"noise N(0, 1) ({samples}, B, {model.num_classes}) -> probs, prior, y0; "
                f"DDIM, {steps} steps, eta=0"
            )
            try:
                program.save(tmp, external_data=False)
            except Exception as exc:
                raise ExportError(f"cannot write {path} ({first_line(exc)})") from exc
            if check:
                checks = [(images, noise)]
                if batch_size is None:
                    checks.append(_example_inputs(model, samples, 3, seed=1))
                _verify(tmp, wrapper, checks, tolerance)
    except OSError as exc:  # renaming the verified file over ``path``
        raise ExportError(f"cannot write {path} ({exc.strerror or type(exc).__name__})") from exc
    finally:
        logging.disable(log_disabled)
    return path
