"""The run's report: results.json, the Markdown results table and the hyper-parameters for TensorBoard."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..yaml_config import to_dict


def cost_text(cells: Sequence[tuple[str, dict]]) -> str:
    """The test-time cost cell of one method's rows, ``(column label, row)`` pairs: the cost once where every
    column's is the same, else each column's under its label (a row chosen per shot may run an inner loop at one
    shot and none at the other)."""
    texts = [(label, ", ".join(f"{k}={v}" for k, v in r["test_cost"].items())) for label, r in cells]
    if len({text for _, text in texts}) <= 1:
        return texts[0][1] if texts else ""
    return "; ".join(f"{label}: {text}" for label, text in texts)


def results_table(rows: Sequence[dict], title: str = "", note: str = "") -> str:
    """A Markdown table of ``results.json`` rows: one line per method, one column per (way, shot); ``note``
    follows it."""
    cols = sorted({(r["way"], r["shot"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["way"], r["shot"]): r for r in rows}
    head = ["method"] + [f"{w}-way {s}-shot" for w, s in cols] + ["test-time cost"]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for meth in methods:
        vals, costs = [], []
        for w, s in cols:
            r = cell.get((meth, w, s))
            vals.append(f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" if r else "")
            costs += [(f"{s}-shot", r)] if r else []
        lines.append("| " + " | ".join([meth] + vals + [cost_text(costs)]) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def flat_hparams(cfg, keep_none: bool = False) -> dict[str, Any]:
    """A dataclass config as flat ``{"section.key": scalar}`` pairs (TensorBoard's hyper-parameters, which
    leave out unset ``None`` settings unless ``keep_none``)."""
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float, str, bool)):
                flat[prefix + k] = v
            elif v is not None:
                flat[prefix + k] = str(v)
            elif keep_none:
                flat[prefix + k] = None

    walk(to_dict(cfg), "")
    return flat


def code_identity() -> dict:
    """What code computed a run: purer's version, a hash of every source file of the package (any change to
    the code changes it), and, in a git checkout, the commit and whether the tree differed from it."""
    import subprocess

    import purer

    root = Path(purer.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    identity = {"version": purer.__version__, "source": h.hexdigest()[:16], "commit": None, "dirty": None}
    try:
        git = ["git", "-C", str(root.parent)]
        identity["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                            timeout=10, check=True).stdout.strip() or None
        identity["dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--", "purer"], capture_output=True,
                                                text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):  # not a git checkout (an installed package), or no git
        pass
    return identity


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a temp file, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
