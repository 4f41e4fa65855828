"""The whole run: data and zoo -> ECI meta-training -> meta-test with the baselines -> the report."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..config import save_config
from ..data import EpisodeSampler, ImageSet, load_split
from .build import load_zoo, zoo_path
from .config import RunConfig, RunError
from .distributed import Dist
from .eci import meta_train_eci
from .metatest import Baselines, evaluate_purer
from .report import flat_hparams, results_table, write_json


def run(cfg: RunConfig, accelerator=None, resume: bool = False, progress: bool = True) -> dict:
    """Run the whole pipeline; write and return ``results.json``'s content.

    Raises:
        RunError: missing dataset or zoo, or task sizes the data cannot supply.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = Path(cfg.output_dir)
    precision = {"mixed_precision": cfg.mixed_precision} if cfg.mixed_precision else {}
    # Without a GPU, cpu=True also lets `accelerate launch --multi_gpu --num_processes N` start N CPU processes.
    acc = accelerator or Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), log_with="tensorboard",
                                     **precision,
                                     project_config=ProjectConfiguration(project_dir=str(out),
                                                                         logging_dir=str(out / "logs")))
    dist = Dist(acc)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.init_trackers("purer", config=flat_hparams(cfg))
    start = time.perf_counter()

    try:
        splits = {s: load_split(cfg.data.dataset, s, cfg.data.root, cfg.data.image_size)
                  for s in ("train", "val", "test")}
    except (OSError, ValueError) as e:  # missing or malformed data, or an unwritable glyph cache
        raise RunError(str(e)) from None
    _check_sizes(cfg, splits)
    teachers = load_zoo(cfg, dist, progress)
    # Everything lives on the accelerator's device from here on: each split is moved once.
    splits = {k: v.to(acc.device) for k, v in splits.items()}
    teachers = [t.to(acc.device) for t in teachers]

    baselines = Baselines(cfg, splits, teachers, dist, progress)
    try:
        learner, summary = meta_train_eci(cfg, acc, dist, teachers, splits["val"], out, resume, progress)
        rows = evaluate_purer(cfg, learner, splits, dist, progress)
        if dist.main:
            learner.test_time = {r["shot"]: r.get("settings", {}) for r in rows if r["method"] == "purer"}
            learner.save_pretrained(out / "meta_learner", dataset=cfg.data.dataset, selected={
                "iteration": summary["best_iteration"], "val_accuracy": summary["val_accuracy"]})
            rows += baselines.rows()
    finally:
        baselines.close()
    results = {"dataset": cfg.data.dataset, "way": cfg.eval.way, "query": cfg.eval.query, "tasks": cfg.eval.tasks,
               "seed": cfg.eval.seed, "train_seed": cfg.seed, "selected_on": "val", "rows": rows,
               "zoo": {"path": str(zoo_path(cfg)), "models": len(teachers)}, "meta_train": summary,
               "processes": dist.world, "seconds": round(time.perf_counter() - start, 1)}
    if dist.main:
        write_json(out / "results.json", results)
        table = results_table(rows, f"{cfg.data.dataset}: {cfg.eval.way}-way, {cfg.eval.tasks} meta-test tasks, "
                                    "mean ± 95% CI (%)")
        (out / "results.md").write_text(table)
        print("\n" + table)
    acc.end_training()
    return results


def _check_sizes(cfg: RunConfig, splits: dict[str, ImageSet]) -> None:
    e, m = cfg.eval, cfg.meta
    for split, way, shots in (("val", e.way, e.shots), ("test", e.way, e.shots), ("val", m.way, [m.shot])):
        for shot in shots:
            try:
                EpisodeSampler(splits[split].class_sizes(), way, shot, e.query)
            except ValueError as err:
                raise RunError(f"{cfg.data.dataset}/{split}: {err}") from None
