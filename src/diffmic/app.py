"""``diffmic app``: a local, offline Gradio page that classifies dropped images with a checkpoint.

Per image it shows the predicted class (the checkpoint's class names), the diffusion probabilities
with the 95 % interval of the sampled y₀ and the chains' votes, the DCG prior beside them, the
saliency map and the ROI boxes with their attention weights (the ``diffmic explain`` figure), and a
"refer to a specialist" flag when the confidence (max probability) is under a threshold
(:class:`Referral`: given directly, or the one that keeps a chosen coverage of the validation split,
as ``evaluate --calibrate`` reports it in ``uncertainty.referral_thresholds``).

Every upload goes through :func:`diffmic.images.load_image`, the one image path of training,
``predict`` and ``explain``, so the app sees exactly the pixels ``diffmic predict`` sees.

The pure parts (upload checks, :class:`Referral`, :func:`image_result`, the HTML, and
:class:`Analyser`, the page's callback) need neither gradio nor a browser; :func:`build_app` and
:func:`launch` import gradio (``pip install 'diffmic[app]'``). The page is served from 127.0.0.1 by
default, with analytics off, no share link, system fonts (no font CDN), no server-side rendering and
no MCP/PWA endpoints.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffmic.errors import ConfigError, DataError, DiffMICError
from diffmic.images import IMAGE_EXTENSIONS, ImageSpec, load_image

if TYPE_CHECKING:  # pragma: no cover
    from diffmic.models.diffmic import DiffMIC

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_SAMPLES = 16
DEFAULT_MAX_UPLOAD_MB = 20.0
# The app names every file over the limit; gradio's own cap (which fails the whole upload with a bare
# "Error") is set this many times higher, only to keep huge files off the disk.
UPLOAD_HARD_CAP_FACTOR = 10
INSTALL_HINT = "pip install 'diffmic[app]'"
# Set before gradio is imported: no usage analytics, no version check, no hub calls.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


class AppDependencyError(DiffMICError, ImportError):
    """The app's optional dependency (gradio) is not installed."""


class UploadRejected(DataError):
    """An upload that is not an image the model can read, or too large."""


# ------------------------------------------------------------------------------ uploads
def _megabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB"


def check_upload(path: str | Path, max_bytes: int) -> Path:
    """Refuse a file that is too large or has no image extension, before it is decoded.

    Raises:
        UploadRejected: one line naming the file and what is accepted.
    """
    p = Path(path)
    if not p.is_file():
        raise UploadRejected(f"{p.name}: not a file")
    size = p.stat().st_size
    if size > max_bytes:
        raise UploadRejected(f"{p.name}: {_megabytes(size)} is over the upload limit of {_megabytes(max_bytes)}")
    if p.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UploadRejected(f"{p.name}: not an image; accepted: {', '.join(IMAGE_EXTENSIONS)}")
    return p


def read_upload(path: str | Path, spec: ImageSpec, max_bytes: int) -> np.ndarray:
    """:func:`check_upload`, then the uint8 array :func:`diffmic.images.load_image` makes of it
    (what ``diffmic predict`` gives the model). A file that does not decode is an
    :class:`UploadRejected` naming it."""
    p = check_upload(path, max_bytes)
    try:
        return load_image(p, spec)
    except DataError as exc:
        reason = str(exc).removeprefix(f"{p}: ")
        raise UploadRejected(f"{p.name}: not a readable image ({reason})") from None


# ------------------------------------------------------------------------------ referral
@dataclass(frozen=True)
class Referral:
    """When to flag "refer to a specialist": confidence (max diffusion probability) < ``threshold``.

    ``threshold`` None: the flag is off. ``coverage``: the fraction of the validation split the
    threshold keeps, when it was derived from one; ``source``: where it came from.
    """

    threshold: float | None = None
    coverage: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"referral threshold must be in [0, 1], got {self.threshold}")

    @property
    def active(self) -> bool:
        return self.threshold is not None

    def refer(self, confidence: float) -> bool | None:
        """True: refer; False: confident enough; None: the flag is off."""
        return None if self.threshold is None else bool(confidence < self.threshold)

    def describe(self) -> str:
        if self.threshold is None:
            return ("Referral flag off: start the app with --coverage C (the confidence threshold that keeps "
                    "a fraction C of the validation split) or --threshold T.")
        where = f" ({self.source})" if self.source else ""
        if self.coverage is None:
            return f"Refer to a specialist when confidence < {self.threshold:.3f}{where}."
        return (f"Refer to a specialist when confidence < {self.threshold:.3f}, the threshold that keeps "
                f"{self.coverage:.0%} of the validation split{where}.")


def _check_coverage(coverage: float) -> float:
    if not 0.0 < coverage <= 1.0:
        raise ConfigError(f"--coverage must be in (0, 1], got {coverage}")
    return float(coverage)


def referral_from_calibration(path: str | Path, coverage: float) -> Referral:
    """The threshold at ``coverage`` from an ``evaluate --calibrate --out FILE`` report
    (``uncertainty.referral_thresholds``, computed on the validation split)."""
    coverage = _check_coverage(coverage)
    p = Path(path)
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"calibration file not found: {p}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a JSON report of 'diffmic evaluate --calibrate' ({exc})") from None
    points = (report.get("uncertainty") or {}).get("referral_thresholds") if isinstance(report, dict) else None
    if not points:
        raise ConfigError(f"{p} has no uncertainty.referral_thresholds: write it with "
                          "'diffmic evaluate --checkpoint ... --calibrate --out FILE'")
    for point in points:
        if math.isclose(float(point["coverage"]), coverage, abs_tol=1e-9):
            return Referral(float(point["threshold"]), coverage,
                            f"{p.name}, {int(point['images'])} images kept")
    have = ", ".join(f"{float(q['coverage']):g}" for q in points)
    raise ConfigError(f"{p} has referral thresholds at coverage {have}, not {coverage:g}; "
                      "leave out --calibration to compute it from the validation split")


def referral_from_validation(checkpoint: str | Path, model: DiffMIC, coverage: float, *,
                             samples: int = DEFAULT_SAMPLES, seed: int = 0) -> Referral:
    """The threshold that keeps ``coverage`` of the checkpoint's validation split, predicted now
    with the app's settings (its stored dataset and, in a run folder, the run's ``split.json``)."""
    from diffmic.evaluation.calibration import threshold_at_coverage
    from diffmic.evaluation.report import evaluate_checkpoint

    coverage = _check_coverage(coverage)
    ev = evaluate_checkpoint(checkpoint, model=model, split="val", samples=samples, seed=seed)
    threshold, kept = threshold_at_coverage(ev.probs, coverage)
    return Referral(threshold, coverage, f"{kept} of {len(ev.probs)} validation images kept")


def check_referral_options(threshold: float | None = None, coverage: float | None = None,
                           calibration: str | Path | None = None) -> None:
    """The ``--threshold`` / ``--coverage`` / ``--calibration`` combination, before anything is loaded."""
    if threshold is not None and (coverage is not None or calibration is not None):
        raise ConfigError("give either --threshold or --coverage (with optional --calibration), not both")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
    if calibration is not None and coverage is None:
        raise ConfigError("--calibration needs --coverage (e.g. --coverage 0.9)")
    if coverage is not None:
        _check_coverage(coverage)


def resolve_referral(checkpoint: str | Path, model: DiffMIC, *, threshold: float | None = None,
                     coverage: float | None = None, calibration: str | Path | None = None,
                     samples: int = DEFAULT_SAMPLES, seed: int = 0) -> Referral:
    """The app's :class:`Referral` from its options (``--threshold`` | ``--coverage`` [+ ``--calibration``])."""
    check_referral_options(threshold, coverage, calibration)
    if threshold is not None:
        return Referral(float(threshold), None, "--threshold")
    if coverage is None:
        return Referral()
    if calibration is not None:
        return referral_from_calibration(calibration, coverage)
    return referral_from_validation(checkpoint, model, coverage, samples=samples, seed=seed)


# ------------------------------------------------------------------------------ display data
@dataclass(frozen=True)
class ImageResult:
    """What the page shows for one image (plain Python numbers, one entry per class)."""

    name: str
    class_names: list[str]
    probs: list[float]  # diffusion probabilities of the checkpoint's readout
    prior: list[float]  # DCG prior
    votes: list[float]  # fraction of the chains whose argmax is each class
    low: list[float]  # 95 % interval of the sampled y0, per class
    high: list[float]
    entropy: float
    samples: int
    boxes: list[tuple[int, int, int, int]]  # ROI crops (row, col, height, width) in model-input pixels
    attention: list[float]  # MIL attention weight of each crop
    refer: bool | None  # None: the referral flag is off
    figure: bytes = field(default=b"", repr=False)  # the explanation figure as PNG, when drawn

    @property
    def prediction(self) -> int:
        return int(np.argmax(self.probs))

    @property
    def predicted_class(self) -> str:
        return self.class_names[self.prediction]

    @property
    def confidence(self) -> float:
        return float(max(self.probs))

    @property
    def prior_class(self) -> str:
        return self.class_names[int(np.argmax(self.prior))]


def _row(x: Any) -> list[float]:
    """Row 0 of a (1, C) tensor/array, or a (C,) one, as floats."""
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return [float(v) for v in (a[0] if a.ndim == 2 else a)]


def image_result(name: str, details: dict[str, Any], explanation: dict[str, Any], class_names: Sequence[str],
                 referral: Referral, samples: int) -> ImageResult:
    """Display data from :meth:`DiffMIC.predict_details` (one image) and :meth:`DiffMIC.explain`."""
    probs = _row(details["probs"])
    if len(probs) != len(class_names):
        raise ValueError(f"{len(probs)} probabilities for {len(class_names)} classes")
    return ImageResult(
        name=name, class_names=list(class_names), probs=probs, prior=_row(details["prior"]),
        votes=_row(details["votes"]), low=_row(details["interval_low"]), high=_row(details["interval_high"]),
        entropy=float(_row(details["entropy"])[0]), samples=int(samples),
        boxes=[tuple(int(v) for v in b) for b in explanation["boxes"]],
        attention=[float(a) for a in np.asarray(explanation["attention"]).reshape(-1)],
        refer=referral.refer(max(probs)),
    )


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def result_html(r: ImageResult, referral: Referral) -> str:
    """One image's block: prediction, referral flag, per-class table, ROI attention table."""
    if r.refer is None:
        flag = '<p class="dm-refer dm-refer-off">Referral flag off.</p>'
    elif r.refer:
        flag = (f'<p class="dm-refer dm-refer-yes"><b>Refer to a specialist</b>: confidence {r.confidence:.3f} '
                f'is under the threshold {referral.threshold:.3f}.</p>')
    else:
        flag = (f'<p class="dm-refer dm-refer-no">No referral: confidence {r.confidence:.3f} '
                f'≥ threshold {referral.threshold:.3f}.</p>')
    rows = "".join(
        f'<tr{" class=dm-top" if c == r.prediction else ""}><td>{_esc(name)}</td><td>{r.probs[c]:.3f}</td>'
        f"<td>[{r.low[c]:.3f}, {r.high[c]:.3f}]</td><td>{r.votes[c]:.2f}</td><td>{r.prior[c]:.3f}</td></tr>"
        for c, name in enumerate(r.class_names))
    figure = "" if not r.figure else (
        f'<img class="dm-figure" alt="ROI boxes, saliency map and probabilities of {_esc(r.name)}" '
        f'src="data:image/png;base64,{base64.b64encode(r.figure).decode()}">')
    rois = "".join(f"<tr><td>{k + 1}</td><td>({row}, {col})</td><td>{h}×{w}</td><td>{a:.3f}</td></tr>"
                   for k, ((row, col, h, w), a) in enumerate(zip(r.boxes, r.attention, strict=False)))
    return (
        f'<section class="dm-result" data-file="{_esc(r.name)}">'
        f'<h3><span class="dm-file">{_esc(r.name)}</span>: '
        f'<span class="dm-pred">{_esc(r.predicted_class)}</span> '
        f'<span class="dm-conf">(p = {r.confidence:.3f})</span></h3>'
        f"{flag}"
        f'<p class="dm-prior">DCG prior alone: {_esc(r.prior_class)} (p = {max(r.prior):.3f}); '
        f"predictive entropy {r.entropy:.3f} nats; {r.samples} reverse chain(s).</p>"
        '<table class="dm-classes"><thead><tr><th>class</th><th>diffusion p</th>'
        "<th>95% interval of y₀</th><th>vote</th><th>DCG prior</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        '<table class="dm-rois"><thead><tr><th>ROI</th><th>(row, col)</th><th>size</th><th>attention</th></tr>'
        f"</thead><tbody>{rois}</tbody></table>{figure}</section>"
    )


def error_html(message: str) -> str:
    return f'<p class="dm-error">Rejected: {_esc(message)}</p>'


def page_html(blocks: Sequence[str], referral: Referral) -> str:
    head = f'<p class="dm-referral">{_esc(referral.describe())}</p>'
    return head + "".join(blocks) if blocks else head + '<p class="dm-empty">Drop one or more images.</p>'


# ------------------------------------------------------------------------------ inference
def analyse(model: DiffMIC, image: np.ndarray, name: str, *, referral: Referral, samples: int = DEFAULT_SAMPLES,
            seed: int = 0) -> tuple[ImageResult, dict[str, Any]]:
    """One prepared image (uint8, from :func:`read_upload`) -> display data and the explanation.

    ``predict_details`` and ``explain`` get generators seeded alike, so their chains (and
    probabilities) agree, and an image's result does not depend on the others uploaded with it.
    """
    import torch

    details = model.predict_details(image, samples=samples, generator=torch.Generator().manual_seed(seed))
    explanation = model.explain(image, samples=samples, generator=torch.Generator().manual_seed(seed))
    return image_result(name, details, explanation, model.class_names, referral, samples), explanation


def explanation_png(image: np.ndarray, explanation: dict[str, Any], class_names: Sequence[str]) -> bytes:
    """The ``diffmic explain`` figure (ROI boxes with attention, saliency, prior vs diffusion) as PNG bytes."""
    from diffmic.evaluation.plots import plot_explanation

    fig = plot_explanation(image, explanation, list(class_names))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


class Analyser:
    """The app's callback, without gradio: uploaded file paths -> the results' HTML."""

    def __init__(self, model: DiffMIC, *, referral: Referral = Referral(), samples: int = DEFAULT_SAMPLES,
                 seed: int = 0, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
        self.model = model
        self.referral = referral
        self.samples = samples
        self.seed = seed
        self.max_bytes = int(max_upload_mb * 1e6)

    def results(self, files: Sequence[Any] | None) -> list[ImageResult | UploadRejected]:
        """Per file, its :class:`ImageResult` (with ``.figure``: the explanation PNG) or why it was rejected."""
        out: list[ImageResult | UploadRejected] = []
        for f in files or []:
            path = Path(getattr(f, "name", f))  # a path string, or a tempfile-like object
            try:
                image = read_upload(path, self.model.image_spec, self.max_bytes)
                result, explanation = analyse(self.model, image, path.name, referral=self.referral,
                                              samples=self.samples, seed=self.seed)
            except DataError as exc:  # a bad upload is reported; the others are still shown
                out.append(exc if isinstance(exc, UploadRejected) else UploadRejected(f"{path.name}: {exc}"))
                continue
            out.append(replace(result, figure=explanation_png(image, explanation, self.model.class_names)))
        return out

    def __call__(self, files: Sequence[Any] | None) -> str:
        blocks = [error_html(str(r)) if isinstance(r, UploadRejected) else result_html(r, self.referral)
                  for r in self.results(files)]
        return page_html(blocks, self.referral)


# ------------------------------------------------------------------------------ gradio
CSS = """
.dm-result table { border-collapse: collapse; margin: 0.3em 0 0.8em 0; }
.dm-result td, .dm-result th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
.dm-result td:first-child, .dm-result th:first-child { text-align: left; }
.dm-top td { font-weight: bold; }
.dm-refer-yes { color: #b00020; }
.dm-refer-no { color: #1b5e20; }
.dm-error { color: #b00020; font-weight: bold; }
.dm-figure { max-width: 100%; height: auto; display: block; margin-bottom: 1.5em; }
"""


def require_gradio() -> Any:
    """Import gradio with analytics off; an :class:`AppDependencyError` saying how to install it."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value
    try:
        import gradio
    except ImportError:
        raise AppDependencyError(f"the app needs gradio: {INSTALL_HINT}") from None
    return gradio


def build_app(model: DiffMIC, *, referral: Referral = Referral(), samples: int = DEFAULT_SAMPLES, seed: int = 0,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, title: str = "DiffMIC") -> Any:
    """The Gradio ``Blocks`` page (not launched)."""
    gr = require_gradio()
    analyser = Analyser(model, referral=referral, samples=samples, seed=seed, max_upload_mb=max_upload_mb)
    names = ", ".join(model.class_names)
    with gr.Blocks(analytics_enabled=False, title=title) as demo:
        gr.Markdown(f"## {_esc(title)}\nClasses: {_esc(names)}. Drop one or more images "
                    f"({', '.join(IMAGE_EXTENSIONS)}, at most {max_upload_mb:g} MB each); "
                    "each is prepared exactly as `diffmic predict` prepares it.")
        # no file_types filter: gradio would drop other files silently; the callback names them instead
        files = gr.File(file_count="multiple", type="filepath", label="Images", elem_id="dm-files")
        button = gr.Button("Classify", variant="primary", elem_id="dm-run")
        out = gr.HTML(page_html([], referral), elem_id="dm-results")
        button.click(analyser, inputs=files, outputs=out, api_name="classify")
        files.upload(analyser, inputs=files, outputs=out, api_name=False)
    return demo


def offline_theme(gr: Any) -> Any:
    """Gradio's default theme with system fonts (its own default pulls fonts from Google)."""
    return gr.themes.Default(font=["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


def launch(checkpoint: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           threshold: float | None = None, coverage: float | None = None, calibration: str | Path | None = None,
           samples: int = DEFAULT_SAMPLES, seed: int = 0, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
           block: bool = True) -> Any:
    """Load the checkpoint, resolve the referral threshold and serve the page on ``host:port``.

    ``block=False`` returns the launched ``Blocks`` (``.close()`` stops it).
    """
    check_referral_options(threshold, coverage, calibration)
    if not max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    gr = require_gradio()  # before the (slow) model load: a missing extra fails at once
    from diffmic import load_model
    from diffmic.prediction import for_inference

    model = for_inference(load_model(checkpoint))  # as `diffmic predict --engine auto`
    referral = resolve_referral(checkpoint, model, threshold=threshold, coverage=coverage, calibration=calibration,
                                samples=samples, seed=seed)
    print(referral.describe(), flush=True)
    demo = build_app(model, referral=referral, samples=samples, seed=seed, max_upload_mb=max_upload_mb,
                     title=f"DiffMIC: {Path(checkpoint).name}")
    demo.queue(default_concurrency_limit=1)
    print(f"serving on http://{host}:{port} (Ctrl+C stops)", flush=True)
    demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                max_file_size=int(UPLOAD_HARD_CAP_FACTOR * max_upload_mb * 1e6), ssr_mode=False, mcp_server=False,
                pwa=False, enable_monitoring=False, footer_links=[], theme=offline_theme(gr), css=CSS, quiet=True,
                show_error=True)
    if block:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo


__all__ = [
    "Analyser",
    "AppDependencyError",
    "ImageResult",
    "Referral",
    "UploadRejected",
    "analyse",
    "build_app",
    "check_referral_options",
    "check_upload",
    "explanation_png",
    "image_result",
    "launch",
    "page_html",
    "read_upload",
    "referral_from_calibration",
    "referral_from_validation",
    "require_gradio",
    "resolve_referral",
    "result_html",
]
