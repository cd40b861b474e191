"""``diffmic report RUN_DIR``: one self-contained HTML page about a finished training run.

The page embeds its figures as base64 PNG data URIs and its CSS inline: no external files, fonts,
scripts or network access. It holds the val/test metrics of the DCG prior and of the diffusion
output, per-class metrics, confusion matrices, calibration before/after temperature scaling (T
fitted on the validation split only), the accuracy-coverage curve with AURC, the training curves,
the most and least confident test images with their ROI boxes, and a model card.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmic._io import atomic_write_text, check_output_file
from diffmic._version import __version__
from diffmic.data.base import DataBundle
from diffmic.errors import ConfigError
from diffmic.evaluation.calibration import apply_temperature
from diffmic.evaluation.metrics import METRIC_NAMES
from diffmic.evaluation.report import EvalReport, RunEvaluation, evaluate_run
from diffmic.models.diffmic import DiffMIC
from diffmic.models.modes import eval_mode
from diffmic.runs import RunDir

REPORT_NAME = "report.html"
METRIC_LABELS = {"acc": "accuracy", "balanced_acc": "balanced acc.", "f1": "macro F1", "qwk": "QWK",
                 "auroc": "AUROC", "ece": "ECE"}
HEADS = (("guidance", "DCG prior alone"), ("diffusion", "DiffMIC (diffusion)"))

INTENDED_USE = (
    "Research only: benchmarking and studying diffusion-based classification of medical images. "
    "Not for clinical use: the model is not a medical device, has not been clinically validated, and "
    "must not be used to diagnose, screen, triage or treat patients."
)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1180px; padding: 1.2em 2em 3em; color: #1b1f23; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.65em; text-align: right; }
th { background: #f6f8fa; }
td.name, th.name { text-align: left; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: 0.88em; color: #57606a; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em;
      border: 1px solid #d0d7de; }
.note { color: #57606a; font-size: 0.92em; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.6em 0.9em; }
dl.card { display: grid; grid-template-columns: max-content auto; gap: 0.25em 1.2em; }
dl.card dt { font-weight: 600; }
dl.card dd { margin: 0; }
"""


def e(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value), quote=True)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def figure_data_uri(fig: Any) -> str:
    """A matplotlib Figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Any, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{e(alt)}" src="{figure_data_uri(fig)}">{cap}</figure>'


# ------------------------------------------------------------------ HTML pieces
def _td(text: str, *, name: bool = False, metric: str | None = None) -> str:
    """A table cell around already escaped / formatted ``text``."""
    attrs = (' class="name"' if name else "") + (f' data-metric="{metric}"' if metric else "")
    return f"<td{attrs}>{text}</td>"


def _th(text: str, *, name: bool = False, metric: str | None = None) -> str:
    attrs = (' class="name"' if name else "") + (f' data-metric="{metric}"' if metric else "")
    return f"<th{attrs}>{e(text)}</th>"


def _table(table_id: str, header: list[str], rows: list[str]) -> str:
    return f'<table id="{table_id}"><tr>{"".join(header)}</tr>{"".join(rows)}</table>'


def _metrics_table(reports: dict[str, EvalReport]) -> str:
    header = [_th("split (images)", name=True), _th("model", name=True)]
    header += [_th(METRIC_LABELS.get(k, k), metric=k) for k in METRIC_NAMES]
    rows = []
    for split, rep in reports.items():
        for key, label in HEADS:
            m = getattr(rep, key)
            cells = [_td(f"{e(split)} ({rep.num_images})", name=True), _td(e(label), name=True)]
            cells += [_td(_fmt(m[k]), metric=k) for k in METRIC_NAMES]
            rows.append(f'<tr data-split="{e(split)}" data-head="{key}">{"".join(cells)}</tr>')
    return _table("metrics", header, rows)


def _per_class_table(rep: EvalReport) -> str:
    header = [_th("class", name=True)] + [_th(h) for h in ("precision", "recall", "F1", "support")]
    rows = [
        "<tr>" + _td(e(r["class"]), name=True)
        + "".join(_td(_fmt(r[k])) for k in ("precision", "recall", "f1"))
        + _td(str(r["support"])) + "</tr>"
        for r in rep.per_class
    ]
    return _table("per-class", header, rows)


def _uncertainty_tables(u: dict[str, Any]) -> tuple[str, str]:
    header = [_th("", name=True), _th("before scaling"), _th("after scaling")]
    lines = (
        (f"ECE, test ({u['n_bins']} bins)", "ece"),
        ("NLL, test", "nll"),
        ("ECE, validation (fitting split)", "val_ece"),
    )
    rows = [f"<tr>{_td(e(label), name=True)}{_td(_fmt(u[k]))}{_td(_fmt(u[k + '_calibrated']))}</tr>"
            for label, k in lines]
    calib = _table("calibration", header, rows)
    cov_rows = [f"<tr>{_td(format(p['coverage'], '.0%'))}{_td(str(p['images']))}"
                f"{_td(_fmt(p['accuracy']))}</tr>"
                for p in u["coverage_accuracy"]]
    cov = _table("coverage", [_th("coverage"), _th("images kept"), _th("accuracy")], cov_rows)
    return calib, cov


def _example_titles(idx: list[int], probs: Tensor, labels: Tensor, names: list[str]) -> list[str]:
    out = []
    for i in idx:
        pred, true = int(probs[i].argmax()), int(labels[i])
        mark = "correct" if pred == true else "wrong"
        out.append(f"true {names[true]}\npred {names[pred]} {float(probs[i, pred]):.2f} ({mark})")
    return out


Boxes = list[list[tuple[int, int, int, int]]]


@torch.no_grad()
def _roi_boxes(model: DiffMIC, images: np.ndarray) -> tuple[Boxes, list[list[float]]]:
    """ROI crops ``(row, col, h, w)`` (model-input pixels) and attention weights from the DCG."""
    with eval_mode(model):
        guide = model.guidance(model.preprocess(images))
    crop = model.guidance.crop_size
    boxes = [[(int(r), int(c), crop, crop) for r, c in corners.tolist()] for corners in guide.corners]
    return boxes, guide.attention.float().cpu().tolist()


def _model_card(
    run_dir: Path,
    model: DiffMIC,
    cfg: Any,
    data: DataBundle,
    extra: dict[str, Any],
    recorded: dict[str, Any],
    settings: dict[str, Any],
    u: dict[str, Any],
) -> str:
    names = model.class_names
    sizes = {s: len(data.split(s)) for s in ("train", "val", "test")}
    per_class = "; ".join(
        f"{s}: " + ", ".join(f"{names[i]} {c}" for i, c in
                             enumerate(np.bincount(data.split(s).labels, minlength=len(names)).tolist()))
        for s in ("train", "val", "test")
    )
    selected = extra.get("selected_epoch", recorded.get("selected_epoch"))
    select_metric = recorded.get("select_metric", f"val/{cfg.train.select_metric}")
    commit = extra.get("git_commit") or recorded.get("git_commit")
    m = cfg.model
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    items = [
        ("Model", (f"DiffMIC: DCG guidance ({m.backbone} global / {m.local_backbone or m.backbone} "
                   f"local, K={m.num_crops} ROI crops) + label denoiser ({m.denoiser_backbone}), "
                   f"{cfg.diffusion.timesteps}-step diffusion")),
        ("Input", f"{model.image_size}×{model.image_size} px, {model.in_chans} channel(s)"),
        ("Classes", ", ".join(names)),
        ("Dataset", data.source or cfg.data.path),
        ("Data format", cfg.data.format),
        ("Split sizes", ", ".join(f"{s} {n}" for s, n in sizes.items())),
        ("Images per class", per_class),
        ("Selected epoch", "not recorded" if selected is None
         else f"{selected} (on validation {select_metric})"),
        ("Git commit", commit or "not recorded"),
        ("Inference", (f"{settings['samples']} reverse chain(s) per image, {settings['sampler']} "
                       f"sampler, {settings['sampling_steps']} steps, seed {settings['seed']}, "
                       f"eval temperature {settings['temperature']}")),
        ("Post-hoc temperature", (f"T = {u['fitted_temperature']:.4g}, fitted on the validation "
                                  f"split ({u['calibration_images']} images) by minimising the NLL")),
        ("Run folder", str(run_dir)),
        ("Report", f"diffmic {__version__}, {now}"),
    ]
    card = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items)
    limitations = [
        (f"Measured on {sizes['test']} test images of one dataset ({data.source or cfg.data.path}); "
         "performance on other sites, scanners, populations or image sizes is unknown."),
        ("Small splits give wide uncertainty around every metric; differences of a few points "
         "between the DCG prior and the diffusion output may be noise."),
        ("The probabilities are model scores, not calibrated clinical risks; temperature scaling "
         f"was fitted on {u['calibration_images']} validation images and may not transfer."),
        "The ROI boxes and saliency show where the DCG looked, not a clinical explanation.",
        ("Class imbalance: see the images per class above; balanced accuracy and per-class recall "
         "are the fairer summaries."),
    ]
    lim = "".join(f"<li>{e(x)}</li>" for x in limitations)
    return (
        f'<dl class="card">{card}</dl>'
        f'<h3>Intended use</h3><p class="warn">{e(INTENDED_USE)}</p>'
        f"<h3>Limitations</h3><ul>{lim}</ul>"
        f"<h3>Resolved configuration</h3><pre>{e(cfg.to_yaml())}</pre>"
    )


# ------------------------------------------------------------------ the report
def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    data: DataBundle | None = None,
    examples: int = 6,
) -> Path:
    """Write the HTML report of a finished training run; returns its path.

    Args:
        run_dir: the run folder (``model.pt``, ``config.yaml``, ``metrics.json``, ``logs/``, ...).
        out: the HTML file (default ``run_dir/report.html``; an existing folder gets
            ``report.html`` inside it); written atomically (temporary file, then rename).
        samples: reverse chains per image (default: the run's ``eval.samples``).
        seed: sampling seed.
        data: the run's data, when it cannot be rebuilt from the stored config (default: rebuilt
            with ``build_data`` and the run's ``split.json`` if it has one).
        examples: how many of the most and of the least confident test images to show.

    Raises:
        ConfigError: ``run_dir`` is not a folder, bad ``samples``, or ``out``'s folder is missing.
        CheckpointError: no or unreadable ``run_dir/model.pt``.
        DataError: the dataset cannot be read, or its val/test split is empty.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ConfigError(f"run folder not found: {run.path}")
    out = Path(out) if out is not None else run.path / REPORT_NAME
    if out.is_dir():
        out = out / REPORT_NAME
    check_output_file(out, ConfigError)
    if samples is not None and samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")
    page = render(evaluate_run(run, data=data, samples=samples, seed=seed), examples=examples)
    try:
        atomic_write_text(out, page)
    except OSError as exc:
        raise ConfigError(f"cannot write {out} ({exc.strerror or type(exc).__name__})") from None
    return out


def render(ev: RunEvaluation, *, examples: int = 6) -> str:
    """The HTML page of an evaluated run."""
    recorded = ev.run.metrics()
    source = ev.data.source or ev.cfg.data.path
    title = f"DiffMIC run report: {ev.run.path.resolve().name}"
    body = [
        f"<h1>{e(title)}</h1>",
        (f'<p class="note">{e(source)} · classes: {e(", ".join(ev.model.class_names))} · '
         f"{e(ev.settings['samples'])} reverse chain(s) per image, seed {e(ev.settings['seed'])} · research "
         "use only, not for clinical use</p>"),
        _metrics_section(ev, recorded),
        _confusion_section(ev),
        _calibration_section(ev),
        _coverage_section(ev),
        '<h2 id="sec-training">Training curves</h2>',
        _training_curves(ev.run),
        _examples_section(ev, examples),
        '<h2 id="sec-model-card">Model card</h2>',
        _model_card(ev.run.path, ev.model, ev.cfg, ev.data, ev.extra, recorded, ev.settings,
                    _uncertainty(ev)),
    ]
    head = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n"
    )
    return head + "\n".join(b for b in body if b) + "\n</body></html>\n"


def _uncertainty(ev: RunEvaluation) -> dict[str, Any]:
    u = ev.test.report.uncertainty
    assert u is not None  # evaluate_run calibrates the test report on val
    return u


def _metrics_section(ev: RunEvaluation, recorded: dict[str, Any]) -> str:
    return "".join([
        '<h2 id="sec-metrics">Metrics: DCG alone vs diffusion</h2>',
        _metrics_table({"val": ev.val.report, "test": ev.test.report}),
        ('<p class="note">Dataset-level metrics; AUROC is macro one-vs-rest; ECE uses 15 equal-width '
         "bins. The checkpoint was selected on the validation split.</p>"),
        _recorded_note(recorded),
        '<h2 id="sec-per-class">Per-class metrics (test, diffusion)</h2>',
        _per_class_table(ev.test.report),
    ])


def _confusion_section(ev: RunEvaluation) -> str:
    from diffmic.evaluation.plots import plot_confusion_matrix

    rep, names = ev.test.report, list(ev.model.class_names)
    return '<h2 id="sec-confusion">Confusion matrix (test)</h2>' + "".join(
        _img(plot_confusion_matrix(cm, names, title=f"{label}, test"),
             f"confusion matrix of the {label} on the test split")
        for cm, label in ((rep.confusion_matrix, "DiffMIC (diffusion)"),
                          (rep.guidance_confusion_matrix, "DCG prior alone"))
    )


def _calibration_section(ev: RunEvaluation) -> str:
    from diffmic.evaluation.plots import plot_reliability

    u = _uncertainty(ev)
    t_fit = u["fitted_temperature"]
    test = ev.test
    calib_table, _ = _uncertainty_tables(u)
    at_bound = (
        '<p class="warn">T reached the edge of the search interval: the validation NLL keeps '
        "falling towards it, typically because the model is no better than chance on the "
        "validation split.</p>"
    )
    return "".join([
        '<h2 id="sec-calibration">Calibration and temperature scaling</h2>',
        (f"<p>Fitted temperature T = <b>{t_fit:.4g}</b> (on the validation split only; applied to "
         "the diffusion probabilities as softmax(log p / T); accuracy is unchanged).</p>"),
        at_bound if u.get("temperature_at_bound") else "",
        calib_table,
        _img(
            plot_reliability(test.probs, test.labels, apply_temperature(test.probs, t_fit), temperature=t_fit),
            "reliability diagram before and after temperature scaling",
            "Test split, diffusion probabilities. Bars: accuracy per confidence bin; dashed: perfect "
            "calibration; grey: fraction of images per bin.",
        ),
    ])


def _coverage_section(ev: RunEvaluation) -> str:
    from diffmic.evaluation.plots import plot_accuracy_coverage

    u = _uncertainty(ev)
    _, cov_table = _uncertainty_tables(u)
    test = ev.test
    return "".join([
        '<h2 id="sec-coverage">Selective prediction: accuracy vs coverage</h2>',
        (f"<p>AURC (area under the risk–coverage curve, lower is better): <b>{_fmt(u['aurc'])}</b> "
         f"with max-probability confidence, {_fmt(u['aurc_entropy'])} with entropy.</p>"),
        cov_table,
        _img(
            plot_accuracy_coverage({"DiffMIC (diffusion)": test.probs, "DCG prior": test.priors}, test.labels),
            "accuracy against coverage",
            "Test split: the least confident images (max probability) are referred first.",
        ),
    ])


def _examples_section(ev: RunEvaluation, examples: int) -> str:
    from diffmic.evaluation.plots import plot_image_grid

    model, test, names = ev.model, ev.test, list(ev.model.class_names)
    grids = []
    for which, idx in _confidence_extremes(test.probs, examples):
        imgs = ev.data.test.images[idx]
        boxes, weights = _roi_boxes(model, imgs)
        fig = plot_image_grid(
            [im[..., 0] if im.shape[-1] == 1 else im for im in imgs],
            _example_titles(idx, test.probs, test.labels, names), boxes, weights,
            ncols=min(6, len(idx)), box_frame=model.image_size,
            suptitle=f"{which} confident test images (ROI boxes with attention weights)",
        )
        grids.append(_img(fig, f"{which} confident test images with their ROI boxes"))
    return "".join([
        '<h2 id="sec-examples">Most and least confident test images</h2>',
        ('<p class="note">Each image shows the DCG&#x27;s ROI crops with their attention weights; the '
         "title gives the true class, the predicted class and its probability.</p>"),
        *grids,
    ])


def _training_curves(run: RunDir) -> str:
    from diffmic.evaluation.plots import plot_training_curves

    csv_path = run.log_file
    if not csv_path.is_file():
        return f'<p class="note">No training log in this run folder ({e(csv_path)} not found).</p>'
    try:
        return _img(plot_training_curves(csv_path), "training curves",
                    f"From {csv_path.relative_to(run.path)}; epochs counted from 1.")
    except (OSError, ValueError, csv.Error) as exc:
        return f'<p class="note">{e(csv_path)}: unreadable ({e(type(exc).__name__)}).</p>'


def _confidence_extremes(probs: Tensor, examples: int) -> list[tuple[str, list[int]]]:
    """Indices of the ``examples`` most and least confident images (max probability)."""
    conf = probs.max(dim=1).values
    k = max(1, min(examples, len(conf) // 2 or 1))
    order = torch.argsort(conf, descending=True, stable=True).tolist()
    return [("most", order[:k]), ("least", order[len(order) - k:][::-1])]


def _recorded_note(recorded: dict[str, Any]) -> str:
    try:
        acc = float(recorded["test"]["diffusion"]["acc"])
    except (KeyError, TypeError, ValueError):
        return ""
    return (f'<p class="note">metrics.json (written at the end of training) records test accuracy '
            f"{_fmt(acc)} for the diffusion output.</p>")


__all__ = ["REPORT_NAME", "figure_data_uri", "render", "write_report"]
