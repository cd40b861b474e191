"""``diffmic app``: its pure functions (no gradio, no browser) and one end-to-end run in headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic import load_model
from diffmic.app import (
    Analyser,
    Referral,
    UploadRejected,
    analyse,
    check_upload,
    image_result,
    page_html,
    read_upload,
    referral_from_calibration,
    referral_from_validation,
    resolve_referral,
    result_html,
)
from diffmic.cli import main
from diffmic.errors import ConfigError
from diffmic.evaluation.calibration import (
    referral_thresholds,
    threshold_at_coverage,
    uncertainty_summary,
)
from diffmic.images import load_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def test_png(tmp_path_factory, breastmnist) -> tuple[Path, np.ndarray]:
    """BreastMNIST's first test image written as a PNG, and the stored uint8 array."""
    image = np.load(breastmnist)["test_images"][0]
    path = tmp_path_factory.mktemp("upload") / "breast_test_0.png"
    Image.fromarray(image).save(path)
    return path, image


# ----------------------------------------------------------------------------- uploads
def test_non_image_is_rejected_by_name(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(UploadRejected, match=r"notes\.txt: not an image; accepted: \.png, \.jpg"):
        check_upload(notes, 10_000)


def test_oversized_upload_is_rejected_with_the_limit(tmp_path):
    big = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)).save(big)
    size = big.stat().st_size
    assert check_upload(big, size) == big  # at the limit: accepted
    with pytest.raises(UploadRejected, match=r"scan\.png: .* MB is over the upload limit of 0\.001 MB"):
        check_upload(big, 1000)


def test_file_with_an_image_name_that_does_not_decode_is_rejected(tmp_path, tiny_checkpoint):
    fake = tmp_path / "fake.png"
    fake.write_text("<html>not a png</html>")
    spec = load_model(tiny_checkpoint[0]).image_spec
    with pytest.raises(UploadRejected, match=r"^fake\.png: not a readable image \(unreadable or corrupt image"):
        read_upload(fake, spec, 10_000)


def test_upload_gets_the_pixels_predict_gets(test_png, tiny_checkpoint):
    path, stored = test_png
    spec = load_model(tiny_checkpoint[0]).image_spec
    arr = read_upload(path, spec, 10**6)
    np.testing.assert_array_equal(arr, load_image(path, spec))  # the one image pipeline
    np.testing.assert_array_equal(arr[..., 0], stored)  # 28x28 grey: the dataset's own pixels


# ----------------------------------------------------------------------------- referral
def test_referral_flag():
    off = Referral()
    assert not off.active and off.refer(0.1) is None
    assert "Referral flag off" in off.describe() and "--coverage" in off.describe()
    on = Referral(0.7, 0.9, "val")
    assert on.refer(0.69) is True and on.refer(0.7) is False and on.refer(0.95) is False
    assert "0.700" in on.describe() and "90%" in on.describe()
    with pytest.raises(ConfigError):
        Referral(1.5)


def test_threshold_keeps_the_coverage():
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.95, 0.85, 0.75, 0.65, 0.5])
    probs = np.stack([conf, 1 - conf], axis=1)
    for coverage in (1.0, 0.9, 0.8, 0.5, 0.1):
        t, k = threshold_at_coverage(probs, coverage)
        assert k == int(np.ceil(coverage * 10))
        assert (conf >= t).sum() == k  # exactly the k most confident are kept, the rest referred
    assert threshold_at_coverage(probs, 0.5) == (0.75, 5)
    points = referral_thresholds(probs, (0.9, 0.5))
    assert points == [{"coverage": 0.9, "threshold": 0.55, "images": 9},
                      {"coverage": 0.5, "threshold": 0.75, "images": 5}]
    with pytest.raises(ValueError):
        threshold_at_coverage(probs, 0.0)


def test_calibrate_report_carries_val_thresholds():
    """``evaluate --calibrate``'s uncertainty section: thresholds from the validation probabilities."""
    g = torch.Generator().manual_seed(0)
    val = torch.rand(50, 3, generator=g).softmax(1)
    test = torch.rand(40, 3, generator=g).softmax(1)
    u = uncertainty_summary(test, torch.zeros(40, dtype=torch.long), val, torch.zeros(50, dtype=torch.long))
    assert u["referral_thresholds"] == referral_thresholds(val)  # val, not test
    assert [p["coverage"] for p in u["referral_thresholds"]] == [1.0, 0.9, 0.8, 0.7, 0.5]


def test_referral_from_calibration_file(tmp_path):
    report = tmp_path / "test.json"
    report.write_text(json.dumps({"uncertainty": {"referral_thresholds": [
        {"coverage": 1.0, "threshold": 0.51, "images": 120}, {"coverage": 0.9, "threshold": 0.62, "images": 108}]}}))
    r = referral_from_calibration(report, 0.9)
    assert (r.threshold, r.coverage) == (0.62, 0.9) and "108 images" in r.source
    with pytest.raises(ConfigError, match="coverage 1, 0.9, not 0.8"):
        referral_from_calibration(report, 0.8)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"uncertainty": {"aurc": 0.2}}))
    with pytest.raises(ConfigError, match="evaluate --checkpoint ... --calibrate"):
        referral_from_calibration(old, 0.9)
    with pytest.raises(ConfigError, match="not found"):
        referral_from_calibration(tmp_path / "missing.json", 0.9)


def test_resolve_referral_options(tiny_checkpoint):
    ckpt = tiny_checkpoint[0]
    assert resolve_referral(ckpt, None) == Referral()  # no option: the flag is off
    assert resolve_referral(ckpt, None, threshold=0.8).threshold == 0.8
    with pytest.raises(ConfigError, match="either --threshold or --coverage"):
        resolve_referral(ckpt, None, threshold=0.8, coverage=0.9)
    with pytest.raises(ConfigError, match="--calibration needs --coverage"):
        resolve_referral(ckpt, None, calibration="x.json")
    with pytest.raises(ConfigError, match=r"--coverage must be in \(0, 1\]"):
        resolve_referral(ckpt, None, coverage=1.5, calibration="x.json")


def test_threshold_from_the_validation_split(tiny_checkpoint):
    from diffmic.evaluation.report import evaluate_checkpoint

    ckpt = tiny_checkpoint[0]
    model = load_model(ckpt)
    r = referral_from_validation(ckpt, model, 0.8, samples=2)
    val = evaluate_checkpoint(ckpt, model=model, split="val", samples=2).probs
    kept = (val.max(1).values >= r.threshold).float().mean().item()
    assert kept >= 0.8 and r.coverage == 0.8 and f"of {len(val)} validation images" in r.source


# ----------------------------------------------------------------------------- display data
def _fake_outputs():
    details = {"probs": torch.tensor([[0.2, 0.8]]), "prior": torch.tensor([[0.45, 0.55]]),
               "votes": torch.tensor([[0.25, 0.75]]), "entropy": torch.tensor([0.5004]),
               "interval_low": torch.tensor([[-1.0, 0.1]]), "interval_high": torch.tensor([[0.2, 1.3]])}
    explanation = {"boxes": [(0, 4, 8, 8), (12, 2, 8, 8)], "attention": np.array([0.7, 0.3])}
    return details, explanation


def test_prediction_to_display_data():
    details, explanation = _fake_outputs()
    r = image_result("<b>x</b>.png", details, explanation, ["malignant", "normal, benign"], Referral(0.85), 16)
    assert r.predicted_class == "normal, benign" and r.confidence == pytest.approx(0.8)
    assert r.prior_class == "normal, benign" and r.refer is True
    assert r.low == pytest.approx([-1.0, 0.1]) and r.high == pytest.approx([0.2, 1.3])
    assert r.boxes == [(0, 4, 8, 8), (12, 2, 8, 8)] and r.attention == pytest.approx([0.7, 0.3])
    text = result_html(r, Referral(0.85))
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;.png" in text  # file names are escaped
    assert '<span class="dm-pred">normal, benign</span>' in text
    assert "Refer to a specialist" in text and "[0.100, 1.300]" in text and "0.700" in text
    assert image_result("x.png", details, explanation, ["a", "b"], Referral(0.5), 16).refer is False
    off = image_result("x.png", details, explanation, ["a", "b"], Referral(), 16)
    assert off.refer is None and "Referral flag off" in result_html(off, Referral())
    assert "Drop one or more images" in page_html([], Referral())
    with pytest.raises(ValueError):
        image_result("x.png", details, explanation, ["a", "b", "c"], Referral(), 16)


def test_analyser_shows_predictions_and_rejections(tiny_checkpoint, test_png, tmp_path):
    """The page's callback on a real image and a text file: the prediction of predict_details."""
    path, _ = test_png
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    model = load_model(tiny_checkpoint[0])
    analyser = Analyser(model, referral=Referral(0.99, None, "--threshold"), samples=4, seed=3)
    results = analyser.results([str(path), str(notes)])
    assert isinstance(results[1], UploadRejected) and "notes.txt: not an image" in str(results[1])
    r = results[0]
    expected = model.predict_details(load_image(path, model.image_spec), samples=4,
                                      generator=torch.Generator().manual_seed(3))
    assert r.probs == pytest.approx(expected["probs"][0].tolist(), abs=1e-6)
    assert r.predicted_class in ("malignant", "benign") and r.figure.startswith(b"\x89PNG")
    assert r.refer is (r.confidence < 0.99)
    text = analyser([str(path), str(notes)])
    assert f'<span class="dm-pred">{r.predicted_class}</span>' in text
    assert "Rejected: notes.txt: not an image" in text and 'src="data:image/png;base64,' in text


# ----------------------------------------------------------------------------- command line
def test_app_without_gradio_says_how_to_install(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["app", "--checkpoint", str(tiny_checkpoint[0])]) == 1
    err = capsys.readouterr().err
    assert err == "diffmic: error: the app needs gradio: pip install 'diffmic[app]'\n"


def test_app_binds_to_localhost_by_default():
    from diffmic.cli import build_parser

    args = build_parser().parse_args(["app", "--checkpoint", "m.pt"])
    assert (args.host, args.port, args.threshold, args.coverage) == ("127.0.0.1", 7860, None, None)


# ----------------------------------------------------------------------------- end to end, in Chromium
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps"]

# The app's process: every non-loopback connect or name lookup is written to stderr (an audit hook).
SERVER = """
import sys
LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", None}
def hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        print(f"NETWORK connect {args[1]!r}", file=sys.stderr, flush=True)
    elif event == "socket.getaddrinfo" and (args[0].decode() if isinstance(args[0], bytes) else args[0]) not in LOCAL:
        print(f"NETWORK getaddrinfo {args[0]!r}", file=sys.stderr, flush=True)
sys.addaudithook(hook)
from diffmic.cli import main
sys.exit(main(sys.argv[1:]))
"""


def chromium_path() -> str | None:
    for candidate in (os.environ.get("DIFFMIC_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"diffmic app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    pytest.fail(f"diffmic app did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.browser
@pytest.mark.subprocess
def test_app_in_headless_chromium(tiny_checkpoint, test_png, tmp_path):
    """Start ``diffmic app`` on a free localhost port, upload a BreastMNIST test image and a text file in
    headless Chromium, read the prediction from the page; nothing leaves localhost (browser or server)."""
    browser = chromium_path()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium, or set DIFFMIC_CHROMIUM)")
    for module, extra in (("gradio", "pip install 'diffmic[app]'"), ("playwright", "pip install playwright")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({extra})")
    from playwright.sync_api import sync_playwright

    ckpt = tiny_checkpoint[0]
    image_path, _ = test_png
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "app.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, "app", "--checkpoint", str(ckpt), "--port", str(port),
                                 "--threshold", "0.99", "--samples", "4"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_server(url, proc, log)
        external: list[str] = []
        with sync_playwright() as p:
            chrome = p.chromium.launch(executable_path=browser, headless=True, args=CHROMIUM_ARGS)
            try:
                page = chrome.new_page()

                def route(r):
                    u = r.request.url
                    if u.startswith(("data:", "blob:")) or urlparse(u).hostname in ("127.0.0.1", "localhost"):
                        r.continue_()
                    else:
                        external.append(u)
                        r.abort()

                page.route("**/*", route)
                page.goto(url, wait_until="networkidle")
                page.set_input_files("#dm-files input[type=file]", [str(image_path), str(notes)])
                page.wait_for_selector("#dm-results .dm-result", timeout=120_000)
                page.wait_for_selector("#dm-results .dm-error", timeout=30_000)
                block = page.locator(f'#dm-results .dm-result[data-file="{image_path.name}"]')
                shown_class = block.locator(".dm-pred").inner_text().strip()
                shown_conf = float(re.search(r"p = ([0-9.]+)", block.locator(".dm-conf").inner_text()).group(1))
                refer_text = block.locator(".dm-refer").inner_text()
                error_text = page.locator("#dm-results .dm-error").inner_text()
                header = page.locator("#dm-results .dm-referral").inner_text()
            finally:
                chrome.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # what `diffmic predict` would say for this file, with the app's settings
    model = load_model(ckpt)
    expected, _ = analyse(model, load_image(image_path, model.image_spec), image_path.name,
                          referral=Referral(0.99), samples=4, seed=0)
    assert shown_class == expected.predicted_class  # a class name of the checkpoint, not an index
    assert shown_conf == pytest.approx(expected.confidence, abs=2e-3)
    assert ("Refer to a specialist" in refer_text) is (expected.confidence < 0.99)
    assert "0.990" in header
    assert "notes.txt: not an image" in error_text
    assert external == [], f"the page requested external URLs: {external}"
    server_log = log.read_text()
    assert "NETWORK" not in server_log, server_log
    assert f"serving on http://127.0.0.1:{port}" in server_log
