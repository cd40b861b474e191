"""Import-layering rules.

Two checks:

* a static one: every ``import`` in ``src/diffmic`` (function-level ones included) is parsed
  with :mod:`ast`; each ``diffmic.*`` target must be allowed by the literal :data:`ALLOWED`
  table, and the module graph must have no cycle;
* a dynamic one: fresh interpreters show which third-party packages a layer loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffmic"

# Which parts of the package each part may import (a part is a top-level module or subpackage).
# Bottom to top: base (errors, _io, _version) <- config, diffusion, images <- models, data <- runs
# <- evaluation, export <- training <- the face (cli, __init__, __main__), which may import all. The
# app sits on top, beside the CLI, and uses only the public API: ``diffmic.load_model`` (the package
# face, "__init__"), images, models and evaluation.
BASE = {"errors", "_io", "_version"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_io": set(),
    "_version": set(),
    "config": {"errors", "_io"},
    "diffusion": {"errors"},
    "images": {"errors"},
    "models": BASE | {"config", "diffusion", "images"},
    "data": BASE | {"config", "images"},
    "runs": BASE | {"config", "data", "models"},
    "evaluation": BASE | {"config", "data", "diffusion", "models", "runs"},
    "export": BASE | {"diffusion", "models", "images"},
    "prediction": BASE | {"images", "models"},  # predict/explain on files: no evaluation (torchmetrics)
    "training": BASE | {"config", "data", "diffusion", "evaluation", "models", "runs"},
    "app": BASE | {"__init__", "images", "models", "evaluation", "prediction"},
}
FACE = {"cli", "__init__", "__main__"}  # the package face may import every part


def part(module: str) -> str:
    """``diffmic.models.diffmic`` -> ``models``; ``diffmic`` -> ``__init__``."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "__init__"


def module_sources(root: Path = SRC) -> dict[str, str]:
    """``{dotted module name: source}`` of every file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        names = list(rel.parts)
        if names[-1] == "__init__":
            names.pop()
        out[".".join(names)] = path.read_text()
    return out


def import_edges(sources: dict[str, str]) -> list[tuple[str, str, int]]:
    """``(importer, imported module, line)`` for every ``diffmic`` import, at any depth in the file.

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    """
    edges = []
    for module, text in sources.items():
        is_package = f"{module}.__init__" in sources or any(m.startswith(module + ".") for m in sources)
        for node in ast.walk(ast.parse(text)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            for target in targets:
                edge = (module, target, node.lineno)
                if (target == "diffmic" or target.startswith("diffmic.")) and edge not in edges:
                    edges.append(edge)
    return edges


def layer_violations(edges: Iterable[tuple[str, str, int]]) -> list[str]:
    bad = []
    for src, dst, line in edges:
        a, b = part(src), part(dst)
        if a == b or a in FACE:
            continue
        if b not in ALLOWED.get(a, set()):
            bad.append(f"{src}:{line} imports {dst} ({a} -> {b} is not allowed)")
    return bad


def import_cycles(edges: Iterable[tuple[str, str, int]]) -> list[list[str]]:
    """The module cycles (strongly connected components with more than one module, or a self-import)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph[n])
        return seen

    reach = {n: reachable(n) for n in graph}
    cycles, done = [], set()
    for n in sorted(graph):
        if n in done or n not in reach[n]:
            continue
        component = sorted(m for m in reach[n] if n in reach[m])
        done.update(component)
        cycles.append(component)
    return cycles


@pytest.fixture(scope="module")
def edges() -> list[tuple[str, str, int]]:
    return import_edges(module_sources())


def test_every_part_is_in_the_table(edges):
    parts = {part(m) for m in module_sources()}
    assert parts - FACE <= set(ALLOWED), sorted(parts - FACE - set(ALLOWED))


def test_imports_follow_the_layers(edges):
    assert len(edges) > 50  # the scan sees the package's imports
    assert layer_violations(edges) == []


def test_no_import_cycles(edges):
    assert import_cycles(edges) == []


def test_checker_detects_violations_and_cycles():
    # a synthetic package: a function-level upward import, a cycle between two files, a relative import
    sources = {
        "diffmic": "",
        "diffmic.models": "",
        "diffmic.models.a": "def f():\n    from diffmic.evaluation.report import x\n    from diffmic.models import b\n",
        "diffmic.models.b": "import diffmic.models.a\n",
        "diffmic.evaluation": "",
        "diffmic.evaluation.report": "from . import metrics\nfrom diffmic.models.a import f\n",
        "diffmic.evaluation.metrics": "",
        "diffmic.cli": "from diffmic.training.api import train\n",
    }
    edges = import_edges(sources)
    assert ("diffmic.models.a", "diffmic.evaluation.report", 2) in edges
    assert ("diffmic.evaluation.report", "diffmic.evaluation.metrics", 1) in edges
    assert layer_violations(edges) == [
        "diffmic.models.a:2 imports diffmic.evaluation.report (models -> evaluation is not allowed)"
    ]
    # report -> a -> report and a -> b -> a share ``a``: one strongly connected component
    assert import_cycles(edges) == [["diffmic.evaluation.report", "diffmic.models.a", "diffmic.models.b"]]
    assert import_cycles(e for e in edges if e[1] != "diffmic.models.b") == [
        ["diffmic.evaluation.report", "diffmic.models.a"]
    ]


# ------------------------------------------------------------- third-party weight, measured
def loaded_after(code: str, cwd: Path | None = None) -> set[str]:
    script = f"import sys\nsys.path.insert(0, '')\n{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                         cwd=cwd)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout.strip().splitlines()[-1]))


def top_level(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


@pytest.fixture(scope="module")
def after_models() -> set[str]:
    return top_level(loaded_after("import diffmic.diffusion, diffmic.models"))


@pytest.fixture(scope="module")
def after_diffusion() -> set[str]:
    return top_level(loaded_after("import diffmic.diffusion"))


@pytest.mark.subprocess
def test_models_do_not_import_lightning_or_matplotlib(after_models):
    assert "diffmic" in after_models and "torch" in after_models
    assert "lightning" not in after_models
    assert "pytorch_lightning" not in after_models
    assert "matplotlib" not in after_models


@pytest.mark.subprocess
def test_diffusion_imports_neither_timm_nor_lightning(after_diffusion):
    assert "torch" in after_diffusion
    for name in ("timm", "lightning", "pytorch_lightning", "matplotlib", "torchmetrics", "sklearn"):
        assert name not in after_diffusion, name


@pytest.mark.subprocess
def test_diffmic_predict_loads_no_evaluation_stack(tmp_path):
    """A ``diffmic predict`` process imports torch and the model, not torchmetrics, matplotlib or scipy
    (they cost seconds per process start; ``evaluate`` and ``report`` still use them)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(tmp_path / "a.png")
    code = f"""
import torch
from conftest import TINY_OVERRIDES
from diffmic.config import DiffMICConfig
from diffmic.models.factory import build_model
from diffmic.models.checkpoint import save_model
cfg = DiffMICConfig.from_yaml(None, ["data.path=x.npz", *TINY_OVERRIDES])
save_model(build_model(cfg, num_classes=2, in_chans=1, image_size=28, class_names=["a", "b"]),
           {str(tmp_path / "m.pt")!r})
from diffmic.cli import main
assert main(["predict", "--checkpoint", {str(tmp_path / "m.pt")!r}, {str(tmp_path / "a.png")!r},
             "--out", {str(tmp_path / "p.csv")!r}]) == 0
"""
    loaded = top_level(loaded_after(code, cwd=Path(__file__).parent))
    assert (tmp_path / "p.csv").read_text().count("\n") == 2  # header and one prediction: it ran
    assert {"torch", "diffmic", "PIL"} <= loaded
    for name in ("torchmetrics", "matplotlib", "scipy", "lightning", "pytorch_lightning", "sklearn"):
        assert name not in loaded, name


@pytest.mark.subprocess
def test_checker_detects_imports():
    # guard against a vacuous check: the same probe does see a module when it is imported
    assert "json" in top_level(loaded_after("import json"))


def test_files_are_written_only_through_diffmic_io():
    """Every writer uses the atomic helpers of ``diffmic._io``: no plain write/rename elsewhere."""
    plain = (".write_text(", ".write_bytes(", "os.replace(", "os.rename(", "tempfile.mkstemp(", "shutil.move(")
    found = [f"{module}: {call}" for module, text in module_sources().items() if module != "diffmic._io"
             for call in plain if call in text]
    assert found == []
    assert "os.replace(" in module_sources()["diffmic._io"]  # the scan reads the sources it should
