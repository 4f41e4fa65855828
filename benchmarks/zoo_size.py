"""Is an ECI iteration's cost flat in the zoo's size?  Small zoos against large, measured so that noise shows.

    python benchmarks/zoo_size.py            # ~15 min on one thread; writes benchmarks/results/zoo_size.{json,md}
    python benchmarks/zoo_size.py --quick    # tiny settings, to check that it works (writes to a temp dir)

``benchmarks/speed.py`` times each setting in its own worker process; its zoo-size rows
(10 / 50 / 100 teachers, 4 per step) rose from 0.49 to 0.68 s per iteration in one run and
were flat in another.  Two ways to tell a cost that grows with the zoo from noise
between processes, both on one thread with :class:`speed.Bench` (the pipeline's
objects over random-weight Conv4 teachers, the same per-step work whatever the zoo):

* **one process**: two replicas of each zoo size built side by side, timed in
  interleaved rounds (every replica once per round, a few iterations each): what the
  zoo's size does inside one process, next to what a second copy of the same size does;
* **separate processes**: fresh processes of one zoo size each, alternating small and
  large: the spread between processes that :mod:`speed` sees.

Each part is the median over rounds of the median over a round's iterations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("inversion", "outer_update", "teacher_passes", "learner_passes", "meta_iteration")


def base_setting(quick: bool):
    from speed import Setting

    if quick:
        return Setting(teachers=3, teachers_per_step=2, image_size=16, images_per_class=4, query=3, meta_batch=2)
    return Setting(teachers=10, teachers_per_step=4, image_size=32, images_per_class=16, query=15, meta_batch=4)


def measure(sizes: list[int], rounds: int, per_round: int, quick: bool) -> dict[str, dict[str, float]]:
    """Replicas of each zoo size in this process, timed in interleaved rounds: ``{"<size>#<replica>": {part: s}}``."""
    import torch

    from speed import Bench

    torch.set_num_threads(1)
    base = base_setting(quick)
    benches = {f"{n}#{j}": Bench(dataclasses.replace(base, teachers=n)) for j, n in enumerate(sizes)}
    for b in benches.values():  # warm-up
        b.iteration()
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in benches}
    for _ in range(rounds):
        for k, b in benches.items():
            its = [b.iteration() for _ in range(per_round)]
            for it in its:
                it["meta_iteration"] = it["inversion"] + it["episodes"] + it["inner_loop"] + it["outer_update"]
            rows[k].append({p: statistics.median(it[p] for it in its) for p in PARTS})
    return {k: {p: round(statistics.median(r[p] for r in rs), 4) for p in PARTS} for k, rs in rows.items()}


def separate(sizes: list[int], rounds: int, per_round: int, quick: bool) -> list[dict]:
    """One fresh process per entry of ``sizes``, in that order."""
    out = []
    for n in sizes:
        cmd = [sys.executable, __file__, "one", str(n), str(rounds), str(per_round)] + (["--quick"] if quick else [])
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        out.append({"teachers": n, **json.loads(res.stdout.strip().splitlines()[-1])[f"{n}#0"]})
    return out


def markdown(rep: dict) -> str:
    head = "| zoo (replica) | " + " | ".join(PARTS) + " |"
    rule = "|---|" + "---:|" * len(PARTS)
    lines = [f"# Cost per ECI iteration against the zoo's size", "",
             f"`python benchmarks/zoo_size.py`; {rep['threads']} thread, {rep['teachers_per_step']} teachers per step, "
             f"{rep['image_size']} px, seconds (median of {rep['rounds']} rounds of {rep['per_round']} iterations). "
             f"Load average at start / end: {rep['load_start']} / {rep['load_end']}.", "",
             "## One process: replicas side by side, interleaved", "", head, rule]
    for k, v in rep["one_process"].items():
        n, j = k.split("#")
        lines.append(f"| {n} teachers (#{j}) | " + " | ".join(f"{v[p]:.3f}" for p in PARTS) + " |")
    lines += ["", "## Separate processes, alternating", "", head, rule]
    for v in rep["separate_processes"]:
        lines.append(f"| {v['teachers']} teachers | " + " | ".join(f"{v[p]:.3f}" for p in PARTS) + " |")
    lines += ["", rep["reading"], ""]
    return "\n".join(lines)


def reading(one: dict, sep: list[dict]) -> str:
    """The largest zoo against the smallest, next to the spread between replicas of one size."""
    sizes = sorted({int(k.split("#")[0]) for k in one})
    small, large = sizes[0], sizes[-1]
    it = lambda n: [v["meta_iteration"] for k, v in one.items() if int(k.split("#")[0]) == n]  # noqa: E731
    spread = max(max(it(n)) - min(it(n)) for n in sizes)
    diff = statistics.fmean(it(large)) - statistics.fmean(it(small))
    sep_it = lambda n: [v["meta_iteration"] for v in sep if v["teachers"] == n]  # noqa: E731
    sep_diff = statistics.fmean(sep_it(large)) - statistics.fmean(sep_it(small))
    sep_spread = max(max(sep_it(n)) - min(sep_it(n)) for n in sizes)
    return (f"One process: {large} teachers minus {small}: {diff:+.3f} s per iteration; replicas of one size differ "
            f"by up to {spread:.3f} s. Separate processes: {sep_diff:+.3f} s; processes of one size differ by up to "
            f"{sep_spread:.3f} s.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    sub = p.add_subparsers(dest="cmd")
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    for name in ("teachers", "rounds", "per_round"):
        one.add_argument(name, type=int)
    one.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.cmd == "one":
        print(json.dumps(measure([a.teachers], a.rounds, a.per_round, a.quick)))
        return 0
    sizes = [3, 6] if a.quick else [10, 100]
    rounds, per_round = (a.rounds or (2 if a.quick else 10)), (2 if a.quick else 5)
    start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    one_process = measure(sizes * 2, rounds, per_round, a.quick)
    sep = separate(sizes * 2, max(rounds // 2, 1), per_round, a.quick)
    base = base_setting(a.quick)
    rep = {"threads": 1, "teachers_per_step": base.teachers_per_step, "image_size": base.image_size,
           "rounds": rounds, "per_round": per_round, "load_start": start,
           "load_end": [round(x, 2) for x in os.getloadavg()], "wall_seconds": round(time.time() - t0),
           "one_process": one_process, "separate_processes": sep, "reading": reading(one_process, sep),
           "command": " ".join(sys.argv)}
    out = Path(tempfile.mkdtemp()) if a.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "zoo_size.json").write_text(json.dumps(rep, indent=1) + "\n")
    (out / "zoo_size.md").write_text(markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
