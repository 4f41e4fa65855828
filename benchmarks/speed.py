"""Seconds and memory per ECI meta-iteration, where the time goes, and how it scales.

One meta-iteration of :func:`purer.pipeline.meta_train_eci` is an episode-inversion
step followed by a meta-update.  This script builds those objects the way the
pipeline does (``RunConfig``, ``PseudoBank``, ``EpisodeInversion``,
``GradientSwitch``, ``build_learner``, Adam, ``EpisodeSampler``, ``meta_step``) over
random-weight Conv4 teachers (timing does not depend on the weights) and times:

* the inversion step, and the adversarial inversion step (with the
  ``-lambda_adv * L_outer`` term of ``GradientSwitch.adversarial_loss``, which
  replaces the plain step on an iteration after the switch fired);
* sampling the meta-batch's pseudo episodes from the bank;
* the MAML inner loop and the outer update.  ``meta_step`` is called unchanged;
  the learner's ``adapt`` is wrapped by a timer, so the inner loop is the time spent
  inside ``adapt`` (support forward, the create-graph gradient, fast weights) and
  the outer update is the rest of ``meta_step`` (query forward, loss, the backward
  pass through the inner step, which is where the second-order cost lands, and Adam);
* the floor (like the adversarial step, for every setting): the
  same teachers' bare forward + backward (to the input) on the same prepared,
  augmented bank images, and the meta-learner's bare second-order passes on the
  same episodes (support forward, create-graph gradient, query forward with the
  fast weights, backward to the weights).  The rest of a step is augmentation,
  BN hooks and R_bn, priors, input preparation, optimizers and bookkeeping.

Settings (the release's CIFAR-FS experiment): Conv4 teachers on 3x32x32 inputs
with 5 classes each, a bank of 16 images per class, 5-way 1-shot 15-query pseudo
tasks, 4 tasks per meta-batch, one second-order inner step at lr 0.01, random
MAML initialisation.  13 teachers with every teacher per inversion step (the
release) and with purer's default of 4 sampled teachers; 84 px inputs; zoos of 10,
50 and 100 teachers, sampled and all per step.

Method: each setting lives in its own fresh worker process (forked from this one,
which only imports), so the worker's peak resident set size (``ru_maxrss``) is that
setting's memory.  Settings of a group are alive together and timed in interleaved
rounds (every setting and thread count once per round), so a burst of load
elsewhere hits them alike; the median over rounds is kept per part.  Groups run one
after another to bound the memory held at once (an all-teacher step keeps every
teacher's graph until its backward pass).  Everything is timed with 1 and with 2
torch threads.  The load average is recorded at the start, after every round and
at the end.

Usage:
    python benchmarks/speed.py           # 10-20 min on 2 shared cores; writes benchmarks/results/speed.{json,md}
    python benchmarks/speed.py --quick   # tiny settings, to check that it works (writes to a temp dir)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.nn.functional as F
from torch.func import functional_call

from purer.data import EpisodeSampler
from purer.inversion import EpisodeInversion, GradientSwitch, PseudoBank
from purer.meta import MAMLConfig, MetaTrainConfig, meta_step
from purer.pipeline import MetaConfig, RunConfig, build_learner
from purer.zoo import ModelConfig, Teacher

RESULTS = Path(__file__).parent / "results"
# Parts of a meta-iteration, and the extra parts timed beside it (the adversarial step instead, the floor).
PARTS = ("inversion", "episodes", "inner_loop", "outer_update")
DETAIL_PARTS = ("adversarial_inversion", "teacher_passes", "learner_passes")


@dataclass(frozen=True)
class Setting:
    """One configuration to time; defaults are the release's CIFAR-FS experiment.

    Attributes:
        teachers: zoo size (Conv4, ``classes`` outputs each).
        teachers_per_step: teachers per inversion step (``InversionConfig.teachers_per_step``).
        image_size, channels: the teachers', bank's and meta-learner's input.
        images_per_class: bank images per class.
        way, shot, query, meta_batch: the pseudo tasks of a meta-update.
        inner_lr, inner_steps: MAML's second-order inner loop.
    """

    teachers: int = 13
    teachers_per_step: int = 4
    image_size: int = 32
    channels: int = 3
    classes: int = 5
    images_per_class: int = 16
    way: int = 5
    shot: int = 1
    query: int = 15
    meta_batch: int = 4
    inner_lr: float = 0.01
    inner_steps: int = 1

    @property
    def name(self) -> str:
        return f"{self.teachers}t-{self.image_size}px-{self.teachers_per_step}ps"


def plan(quick: bool) -> list[list[Setting]]:
    """The groups of settings: each group is timed together, groups one after another."""
    if quick:
        base = Setting(teachers=3, teachers_per_step=2, image_size=16, images_per_class=4, query=3, meta_batch=2)
        zoo_sizes, large = (4, 6), 20
    else:
        base = Setting()
        zoo_sizes, large = (10, 50, 100), 84
    every = dataclasses.replace(base, teachers_per_step=base.teachers)
    main = [every, base, dataclasses.replace(base, image_size=large)]
    # Zoo sizes; the largest all-teacher zoo alone, as its step holds every teacher's graph.
    sampled = [dataclasses.replace(base, teachers=n) for n in zoo_sizes]
    full = [dataclasses.replace(base, teachers=n, teachers_per_step=n) for n in zoo_sizes]
    return [main, sampled + full[:-1], full[-1:]]


def random_zoo(s: Setting) -> list[Teacher]:
    """``s.teachers`` random-weight Conv4 teachers with distinct class ids."""
    zoo = []
    for i in range(s.teachers):
        config = ModelConfig("conv4", s.classes, [f"m{i}c{k}" for k in range(s.classes)], in_channels=s.channels,
                             image_size=s.image_size)
        zoo.append(Teacher(config.build(), config, f"m{i:03d}"))
    return zoo


class Bench:
    """The objects of one meta-training run, built as :func:`purer.pipeline.meta_train_eci` builds them."""

    def __init__(self, s: Setting, seed: int = 0, device: str = "cpu", autocast: torch.dtype | None = None,
                 batching: str = "auto"):
        torch.manual_seed(seed)
        self.setting, self.device = s, torch.device(device)
        cfg = RunConfig(seed=seed, meta=MetaConfig(way=s.way, shot=s.shot, query=s.query,
                                                   images_per_class=s.images_per_class,
                                                   maml=MAMLConfig(inner_lr=s.inner_lr, inner_steps=s.inner_steps),
                                                   train=MetaTrainConfig(meta_batch=s.meta_batch)))
        cfg.inversion = dataclasses.replace(cfg.inversion, teachers_per_step=s.teachers_per_step,
                                            teacher_batching=batching)
        m = cfg.meta
        teachers = [t.to(self.device) for t in random_zoo(s)]
        self.bank = PseudoBank(teachers, m.images_per_class, image_size=s.image_size, channels=s.channels,
                               merge_shared_classes=cfg.zoo.merge_shared_classes, seed=seed, device=self.device)
        self.inversion = EpisodeInversion(teachers, self.bank, cfg.inversion, autocast=autocast)
        self.switch = GradientSwitch(cfg.switch)
        self.learner = build_learner(cfg, teachers, s.channels, s.image_size).to(self.device)
        self.learner.task_batching = batching
        self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=m.train.outer_lr)
        self.train_tasks = EpisodeSampler(self.bank.class_sizes(), m.way, m.shot, m.query, seed=seed)
        self.fresh_tasks = EpisodeSampler(self.bank.class_sizes(), m.way, m.shot, m.query, seed=seed + 10_000)
        self.iterations = 0
        self.inner_seconds = 0.0
        adapt = self.learner.adapt

        def timed_adapt(*args, **kwargs):
            start = self.now()
            try:
                return adapt(*args, **kwargs)
            finally:
                self.inner_seconds += self.now() - start

        # An instance attribute shadows the method, so outer_loss (inside meta_step) calls the timer.
        self.learner.adapt = timed_adapt

    def now(self) -> float:
        """A timestamp after the device has finished its queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def iteration(self) -> dict[str, float]:
        """One meta-iteration, an adversarial inversion step instead and the floor; seconds per part.

        The inner loop is timed apart only where the learner adapts task by task (on a CPU); with tasks
        vmapped together it is part of the outer update.
        """
        it, mb = self.iterations, self.setting.meta_batch
        t0 = self.now()
        chosen = self.inversion.sample_teachers()
        self.inversion.step(teachers=chosen, total=len(chosen))
        t1 = self.now()
        with torch.no_grad():
            episodes = [self.bank.episode(self.train_tasks.task(it * mb + j)) for j in range(mb)]
        episodes = [e.detach() for e in episodes]
        t2 = self.now()
        self.inner_seconds = 0.0
        meta_step(self.learner, self.optimizer, episodes, total=mb)
        t3 = self.now()
        parts = {"inversion": t1 - t0, "episodes": t2 - t1, "inner_loop": self.inner_seconds,
                 "outer_update": t3 - t2 - self.inner_seconds}
        t4 = self.now()
        extra = self.switch.adversarial_loss(self.learner, self.fresh_tasks.task(it))
        self.inversion.step(extra_loss=extra, teachers=chosen, total=len(chosen))
        parts["adversarial_inversion"] = self.now() - t4
        parts["teacher_passes"] = self.teacher_passes(chosen)
        parts["learner_passes"] = self.learner_passes(episodes)
        self.iterations += 1
        return parts

    def teacher_passes(self, chosen: list[int]) -> float:
        """Seconds of the bare forward + backward (to the input) of the ``chosen`` teachers on their prepared,
        augmented images, in the form the inversion step runs them (:meth:`EpisodeInversion.bare_forward`:
        one teacher after another in the channels-last layout on a CPU, or vmapped over each group of
        same-contract teachers)."""
        inv = self.inversion
        with torch.no_grad():
            groups = inv.teacher_inputs(chosen)
        self.bank.pop_touched()
        seconds = 0.0
        for g in groups:
            z = g.augmented_inputs.detach().requires_grad_(True)
            start = self.now()
            torch.autograd.grad(inv.bare_forward(g.key, g.members, z).sum(), z)
            seconds += self.now() - start
        return seconds

    def learner_passes(self, episodes) -> float:
        """Seconds of the meta-learner network's bare second-order MAML passes on ``episodes``."""
        s, model = self.setting, self.learner.model
        params = dict(model.named_parameters())
        seconds = 0.0
        for ep in episodes:
            with torch.no_grad():
                sx, qx = self.learner.prepare(ep.support_x), self.learner.prepare(ep.query_x)
            start = self.now()
            fast = params
            for _ in range(s.inner_steps):
                loss = F.cross_entropy(functional_call(model, fast, (sx,)), ep.support_y)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: p - s.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
            loss = F.cross_entropy(functional_call(model, fast, (qx,)), ep.query_y)
            torch.autograd.grad(loss, list(params.values()))
            seconds += self.now() - start
        return seconds


def dense_adam_seconds(bank: PseudoBank, repeats: int = 5) -> float:
    """One Adam step over a single tensor holding the whole bank: what the lazy per-class Adam avoids."""
    p = torch.nn.Parameter(torch.randn(bank.num_classes, *bank.logits[0].shape))
    opt = torch.optim.Adam([p], lr=0.25)
    p.grad = torch.randn_like(p)
    opt.step()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - start) / repeats


def summarise(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median over rounds of every part, and the totals built from those medians."""
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    med["meta_step"] = med["inner_loop"] + med["outer_update"]
    med["meta_iteration"] = med["inversion"] + med["episodes"] + med["meta_step"]
    med["adversarial_meta_iteration"] = med["adversarial_inversion"] + med["episodes"] + med["meta_step"]
    med["floor"] = med["teacher_passes"] + med["learner_passes"]
    med["floor_share"] = med["floor"] / med["meta_iteration"]
    return med


def rounded(obj, digits: int = 4):
    """``obj`` with every float rounded to ``digits`` decimals (for a readable JSON file)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- worker process: one Bench per process, kept between calls ----
_BENCH: Bench | None = None


def _build(setting: Setting) -> dict[str, float]:
    global _BENCH
    torch.set_num_threads(1)
    before = rss_mb()
    _BENCH = Bench(setting)
    return {"after_import": before, "after_build": rss_mb()}


def _run(threads: int, iterations: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    samples = [_BENCH.iteration() for _ in range(iterations)]
    return {k: sum(x[k] for x in samples) / iterations for k in samples[0]}


def _finish() -> dict[str, float]:
    peak = rss_mb()  # read before the dense-Adam comparison allocates a bank-sized tensor
    torch.set_num_threads(1)
    return {"peak": peak, "dense_adam": dense_adam_seconds(_BENCH.bank)}


def time_group(group: list[Setting], threads: tuple[int, ...], rounds: int, warmup: int, steps: int,
               loads: list[list[float]]) -> dict[str, dict]:
    """Interleaved rounds over ``group`` (one worker process per setting); raw per-round parts and memory."""
    # Forked workers skip re-importing torch; safe because this process never runs a torch op,
    # so no OpenMP thread pool exists to be copied half-initialised.
    ctx = multiprocessing.get_context("fork")
    out = {s.name: {"rounds": {str(t): [] for t in threads}} for s in group}
    with contextlib.ExitStack() as stack:
        pools = {s.name: stack.enter_context(ctx.Pool(1)) for s in group}
        for s in group:
            out[s.name]["rss_mb"] = pools[s.name].apply(_build, (s,))
            for t in threads:
                pools[s.name].apply(_run, (t, warmup))
        for r in range(rounds):
            for t in threads:
                for s in group:
                    parts = pools[s.name].apply(_run, (t, steps))
                    out[s.name]["rounds"][str(t)].append(parts)
                    total = sum(parts[k] for k in PARTS)
                    print(f"round {r + 1}/{rounds}  {s.name:18s} {t} thread(s): {total:.3f} s/iteration", flush=True)
            loads.append([round(x, 2) for x in os.getloadavg()])
        for s in group:
            finish = pools[s.name].apply(_finish)
            out[s.name]["rss_mb"]["peak"] = finish["peak"]
            out[s.name]["dense_adam_seconds"] = finish["dense_adam"]
    return out


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# ---- Markdown ----
def _cell(res: dict, name: str, threads: int, key: str) -> str:
    v = res["settings"][name]["seconds"][str(threads)].get(key)
    return "" if v is None else f"{v:.3f}"


def markdown(res: dict, groups: list[list[Setting]]) -> str:
    threads = res["threads"]
    every, sampled, large = groups[0]
    env = res["environment"]
    peak_load = max(x[0] for x in [env["loadavg_start"], *env["loadavg_after_each_round"], env["loadavg_end"]])
    crowded = (f" The CPU was shared with other jobs (load above {env['cpu_count']} cores), so absolute seconds "
               "are pessimistic, and a multi-thread figure then mostly measures waiting for a free core (each "
               "parallel op needs all its threads scheduled): compare settings at 1 thread."
               if peak_load > env["cpu_count"] else "")
    lines = [f"# ECI meta-iteration speed ({'quick check' if res['quick'] else 'full run'})", "",
             f"`python benchmarks/speed.py`; {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, "
             f"{env['platform']}; {env['wall_seconds'] / 60:.0f} min wall. Load average (1/5/15 min) "
             f"{env['loadavg_start']} at the start, {env['loadavg_end']} at the end, 1-minute peak {peak_load:.1f} "
             f"(this benchmark's own threads count: 1-2).{crowded} Settings of a group were timed in "
             f"interleaved rounds (median of {res['rounds']}); the groups (the 13-teacher settings, the zoo "
             f"sizes, the largest all-teacher zoo) one after another. Random-weight Conv4 teachers, 5 classes each, "
             f"bank of {every.images_per_class} images per class, {every.way}-way {every.shot}-shot "
             f"{every.query}-query pseudo tasks, {every.meta_batch} per meta-batch, "
             f"{every.inner_steps} second-order inner step at lr {every.inner_lr}. "
             "Peak memory: `ru_maxrss` of a fresh process per setting (includes ~"
             f"{res['settings'][every.name]['rss_mb']['after_import']:.0f} MB for Python, torch and purer).", ""]

    lines += [f"## {every.teachers} teachers, {every.image_size} px: seconds per meta-iteration", "",
              "| part | " + " | ".join(f"{s.teachers_per_step} of {s.teachers} per step, {t} thr"
                                     for s in (every, sampled) for t in threads) + " |",
              "|---|" + "---:|" * (2 * len(threads))]
    rows = [("inversion step", "inversion"),
            ("adversarial inversion step (instead, after the switch fires)", "adversarial_inversion"),
            (f"pseudo episodes ({every.meta_batch} tasks)", "episodes"),
            ("MAML inner loop (all tasks)", "inner_loop"),
            ("outer update (query loss, second-order backward, Adam)", "outer_update"),
            ("**meta-iteration**", "meta_iteration"),
            ("meta-iteration with the adversarial step", "adversarial_meta_iteration"),
            ("floor: teachers' bare forward+backward", "teacher_passes"),
            ("floor: meta-learner's bare second-order passes", "learner_passes")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(res, s.name, t, key) for s in (every, sampled)
                                                   for t in threads) + " |")
    lines.append("| peak RSS (MB) | " + " | ".join(f"{res['settings'][s.name]['rss_mb']['peak']:.0f}"
                                                  for s in (every, sampled) for _ in threads) + " |")

    lines += ["", "## The floor: networks' own passes versus everything else", "",
              "Share of the meta-iteration spent in the teachers' and the meta-learner's bare "
              "forward/backward passes on the same tensors; the rest is augmentation, BN hooks and "
              "R_bn, priors, input preparation, the optimizers and bookkeeping.", "",
              "| setting | threads | meta-iteration (s) | floor (s) | floor share | inversion outside teacher passes "
              "| meta-step outside learner passes |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, entry in res["settings"].items():
        for t in threads:
            m = entry["seconds"][str(t)]
            lines.append(f"| {name} | {t} | {m['meta_iteration']:.3f} | {m['floor']:.3f} | "
                         f"{100 * m['floor_share']:.0f}% | {100 * (1 - m['teacher_passes'] / m['inversion']):.0f}% | "
                         f"{100 * (1 - m['learner_passes'] / m['meta_step']):.0f}% |")

    zoo = sorted((s for g in groups for s in g if s.image_size == every.image_size),
                 key=lambda s: (s.teachers_per_step >= s.teachers, s.teachers))
    lines += ["", "## Zoo size", "",
              "Seconds per inversion step / per meta-iteration; dense Adam: one Adam step over a single "
              "bank-sized tensor (1 thread), the per-step cost the lazy per-class Adam avoids.", "",
              "| teachers | per step | " + " | ".join(f"{t} thr: inversion / iteration" for t in threads)
              + " | peak RSS (MB) | dense Adam (s) |", "|---:|---:|" + "---:|" * (len(threads) + 2)]
    for s in zoo:
        e = res["settings"][s.name]
        lines.append(f"| {s.teachers} | {s.teachers_per_step} | " + " | ".join(
            f"{_cell(res, s.name, t, 'inversion')} / {_cell(res, s.name, t, 'meta_iteration')}" for t in threads)
            + f" | {e['rss_mb']['peak']:.0f} | {e['dense_adam_seconds']:.4f} |")

    lines += ["", "## Image size", "", f"{sampled.teachers} teachers, {sampled.teachers_per_step} per step.", "",
              "| image size | " + " | ".join(f"{t} thr: inversion / meta-step / iteration" for t in threads)
              + " | peak RSS (MB) |", "|---:|" + "---:|" * (len(threads) + 1)]
    for s in (sampled, large):
        lines.append(f"| {s.image_size} px | " + " | ".join(
            " / ".join(_cell(res, s.name, t, k) for k in ("inversion", "meta_step", "meta_iteration"))
            for t in threads) + f" | {res['settings'][s.name]['rss_mb']['peak']:.0f} |")
    mt = res.get("meta_test")
    if mt:
        lines += ["", "## Meta-test", "",
                  f"{mt['scaled_to']} tasks of MAML (3x32x32, 5-way 1-shot, 15 queries, 10 test-time steps), one "
                  f"thread; timed on {mt['tasks_timed']} tasks and scaled.", "",
                  "| tasks | seconds | accuracy (%) |", "|---|---:|---:|",
                  f"| one by one (the CPU default) | {mt['loop']['seconds']} | {mt['loop']['accuracy']} |",
                  f"| vmapped together, chunks of 50 (the GPU default) | {mt['vmap']['seconds']} | "
                  f"{mt['vmap']['accuracy']} |"]
    return "\n".join(lines) + "\n"


def time_meta_test(tasks: int, scale_to: int = 600) -> dict:
    """Seconds of a meta-test of ``scale_to`` tasks (MAML, 3x32x32, 5-way 1-shot 15-query, 10 test-time steps at
    lr 0.1, one thread), measured on ``tasks`` of them and scaled, with the tasks adapted one by one (this CPU's
    default) and vmapped together in chunks of 50 (a GPU's default); the accuracies must agree."""
    from purer.data import ImageSet
    from purer.evaluate import evaluate, task_list
    from purer.meta import MAML, InputSpec, random_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(20 * 40, 3, 32, 32, generator=g), torch.arange(20).repeat_interleave(40),
                    [f"c{i}" for i in range(20)])
    learner = MAML(random_model("conv4", 5, 3, 32, seed=0), 5, InputSpec(3, 32), MAMLConfig(inner_lr=0.1,
                                                                                            inner_steps=10))
    chosen = task_list(data, 5, 1, 15, tasks, 0)
    out = {"tasks_timed": tasks, "scaled_to": scale_to}
    for mode in ("loop", "vmap"):
        learner.task_batching = mode
        evaluate(learner, data, chosen[:5], progress=False, chunk=5)  # warm-up
        result = evaluate(learner, data, chosen, progress=False, chunk=50)
        out[mode] = {"seconds": round(result.seconds * scale_to / tasks, 1), "accuracy": round(result.accuracy, 2)}
    return out


def main(quick: bool = False, threads: tuple[int, ...] = (1, 2), rounds: int | None = None, warmup: int = 1,
         steps: int = 1, out: Path | None = None) -> dict:
    """Time every group of :func:`plan`, write ``speed.json`` and ``speed.md`` to ``out`` and return the results.

    ``rounds`` defaults to 5 (2 with ``quick``); ``steps`` meta-iterations per round are averaged.
    """
    out = out or (Path(tempfile.gettempdir()) / "purer-speed-quick" if quick else RESULTS)
    rounds = rounds or (2 if quick else 5)
    groups = plan(quick)
    names = [s.name for g in groups for s in g]
    if len(set(names)) != len(names):
        raise ValueError(f"two settings share a name: {names}")
    start, load_start, loads = time.perf_counter(), [round(x, 2) for x in os.getloadavg()], []
    settings = {}
    for group in groups:
        raw = time_group(group, threads, rounds, warmup, steps, loads)
        for s in group:
            r = raw[s.name]
            settings[s.name] = {"setting": dataclasses.asdict(s),
                                "seconds": {t: summarise(v) for t, v in r["rounds"].items()},
                                "rss_mb": r["rss_mb"], "dense_adam_seconds": r["dense_adam_seconds"],
                                "rounds": r["rounds"]}
    meta_test = time_meta_test(10 if quick else 100)
    res = {"quick": quick, "threads": list(threads), "rounds": rounds, "warmup_iterations": warmup,
           "iterations_per_round": steps, "statistic": "median over rounds per part; totals are sums of medians",
           "settings": settings, "meta_test": meta_test,
           "environment": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                           "loadavg_start": load_start, "loadavg_after_each_round": loads,
                           "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                           "wall_seconds": round(time.perf_counter() - start, 1)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(rounded(res), indent=1) + "\n")
    (out / "speed.md").write_text(markdown(res, groups))
    print(f"wrote {out / 'speed.json'} and {out / 'speed.md'} ({res['environment']['wall_seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings and 2 rounds, to check the script")
    parser.add_argument("--out", type=Path, help="output directory (default: benchmarks/results, or a temp "
                                                 "directory with --quick)")
    args = parser.parse_args()
    main(quick=args.quick, out=args.out)
