"""ACC and AUROC of the DCG's fused, global-only and local-only priors of trained models: a diagnosis.

For each ``model.pt`` and split (the model's own data set): the DCG prior as shipped, softmax of the
fused logits ½(g + l) (``fused``), and softmax of each branch's logits alone (``global``, ``local``;
``local`` is left out for a model trained without a local branch, whose fused logits are g).
Read the test columns as a diagnosis only: choose on val.

    python benchmarks/dcg_branches.py runs/breastmnist/model.pt --out branches.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model.pt files of trained runs")
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=("train", "val", "test"))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="JSON file to write")
    return p.parse_args(argv)


def branch_logits(model, images, *, batch_size: int = 256):
    """{'fused', 'global'[, 'local']} -> logits (N, C) of the DCG on ``images`` (N, C, H, W) in [0, 1]."""
    import torch

    parts: dict[str, list] = {"fused": [], "global": []}
    has_local = bool(getattr(model.guidance, "local_branch", True))
    if has_local:
        parts["local"] = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            guide = model.guidance(model.normalize(images[i:i + batch_size]))
            parts["fused"].append(guide.logits)
            parts["global"].append(guide.logits_global)
            if has_local:
                parts["local"].append(guide.logits_local)
    return {k: torch.cat(v) for k, v in parts.items()}


def branch_scores(model, images, labels, *, batch_size: int = 256) -> dict[str, dict[str, float]]:
    from diffmic.evaluation.metrics import classification_metrics

    out = {}
    for name, logits in branch_logits(model, images, batch_size=batch_size).items():
        m = classification_metrics(logits.softmax(1), labels, num_classes=model.num_classes)
        out[name] = {"acc": round(m["acc"], 4), "auroc": round(m["auroc"], 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.set_threads(args.threads)
    result = {"info": common.run_info("benchmarks/dcg_branches.py", argv), "models": {}}

    def each(path, model, data) -> None:
        per_split = {}
        for split in args.splits:
            images, labels = common.split_tensors(getattr(data, split))
            per_split[split] = branch_scores(model, images, labels, batch_size=args.batch_size)
        result["models"][str(path)] = per_split
        common.print_scores(path, per_split, 13)

    if common.for_each_model("dcg_branches", args.models, each):
        return 1
    return common.finish(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
