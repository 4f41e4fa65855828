"""How sure a zoo's teachers are, by architecture, on their real classes and off them.

    python benchmarks/teacher_confidence.py model_zoo/zoos/glyphs-mix --out benchmarks/results/teacher_confidence_sh.json

Zoo distillation hands the learner each teacher's temperature-softened outputs on pseudo
images, which lie off the real images' manifold (and the adversarial curriculum pushes
them further off).  For every teacher this reports, on the real meta-train images of its
own classes and on 64 noise images (sigmoid of standard normal pixels, the bank's
starting point): the per-image standard deviation of its logits, the entropy of its
outputs at the distillation's temperature (T = 4), and its mean top-1 probability,
averaged per architecture.  A teacher that is as sure on noise as on its classes hands
the learner confident targets that carry no knowledge.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from purer.data import load_split
from purer.zoo.store import Zoo


def entropy(p: torch.Tensor) -> float:
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


@torch.no_grad()
def confidence(zoo_path: Path, temperature: float = 4.0) -> dict:
    teachers = Zoo(zoo_path).load_teachers()
    by_dataset = {}
    rows: dict[str, list[dict]] = {}
    g = torch.Generator().manual_seed(0)
    for t in teachers:
        c = t.config
        key = (c.dataset, c.image_size)
        if key not in by_dataset:
            by_dataset[key] = load_split(c.dataset, "train", None, c.image_size)
        train = by_dataset[key]
        index = {n: i for i, n in enumerate(train.class_names)}
        real = torch.cat([train.float_images(train.members(index[k])) for k in c.class_ids])
        noise = torch.sigmoid(torch.randn(64, c.in_channels, c.image_size, c.image_size, generator=g))
        row = {"model": t.model_id}
        for name, x in (("real", real), ("noise", noise)):
            z = t(x)
            row[name] = {"logit_std": float(z.std(-1).mean()), f"entropy_T{temperature:g}":
                         entropy(F.softmax(z / temperature, -1)), "top1": float(F.softmax(z, -1).max(-1).values.mean())}
        rows.setdefault(c.arch, []).append(row)
    summary = {arch: {part: {k: round(statistics.fmean(r[part][k] for r in rs), 3) for k in rs[0][part]}
                      for part in ("real", "noise")} for arch, rs in rows.items()}
    return {"zoo": str(zoo_path), "temperature": temperature, "max_entropy": round(math.log(teachers[0].config.num_classes), 3),
            "by_architecture": summary, "teachers": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("zoo", type=Path)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    report = confidence(a.zoo)
    for arch, parts in report["by_architecture"].items():
        print(arch, json.dumps(parts))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
