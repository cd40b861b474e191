"""``diffmic explain``: figures for image files, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffmic.cli import main


@pytest.fixture
def two_pngs(tiny_checkpoint, tmp_path):
    _, data = tiny_checkpoint
    images = np.load(data)["test_images"][:2]
    paths = []
    for i, im in enumerate(images):
        p = tmp_path / f"scan{i}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_writes_one_figure_per_image(tiny_checkpoint, two_pngs, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    out_dir = tmp_path / "explain"  # does not exist yet: its parent does
    code, out, err = run(["explain", "--checkpoint", ckpt, *two_pngs, "--out", out_dir], capsys)
    assert code == 0, err
    for p in two_pngs:
        fig = out_dir / f"{p.stem}_explain.png"
        assert fig.is_file() and fig.stat().st_size > 5_000
        with Image.open(fig) as im:
            assert im.size[0] > 100
    assert sorted(f.name for f in out_dir.iterdir()) == ["scan0_explain.png", "scan1_explain.png"]
    assert "2 explanations" in out


def test_explain_bad_image_is_one_line(tiny_checkpoint, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    code, _, err = run(["explain", "--checkpoint", ckpt, bad, "--out", tmp_path / "o"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("diffmic: error:") and "broken.png" in lines[0]


def test_explain_output_parent_missing(tiny_checkpoint, two_pngs, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    code, _, err = run(["explain", "--checkpoint", ckpt, two_pngs[0], "--out", tmp_path / "no" / "dir"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "does not exist" in lines[0]


def test_explain_output_is_a_file(tiny_checkpoint, two_pngs, tmp_path, capsys):
    ckpt, _ = tiny_checkpoint
    f = tmp_path / "file.txt"
    f.write_text("x")
    code, _, err = run(["explain", "--checkpoint", ckpt, two_pngs[0], "--out", f], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a folder" in err


def test_explain_help_shows_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "diffmic explain --checkpoint" in out
