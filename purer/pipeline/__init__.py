"""The PURER pipeline: zoo -> teachers -> bank -> episodes -> meta-learner -> calibrated prediction.

``recipes/purer.py`` is a thin command line around :func:`run`.  The stages, and the services they call:

- :mod:`~purer.pipeline.run_config`: the run's config sections (:class:`RunConfig`) and :class:`RunError`;
- :mod:`~purer.pipeline.build`: the zoo's teachers (pre-trained on first use), the bank, the learner;
- :mod:`~purer.pipeline.eci`: ECI meta-training (:class:`ECI`, the algorithm; :func:`meta_train_eci`, the run);
- :mod:`~purer.pipeline.metatest`: meta-test, plain and after each calibration;
- :mod:`~purer.pipeline.baselines`: the cached baseline rows, computed in the background;
- :mod:`~purer.pipeline.report`: results.json and the results table;
- :mod:`~purer.pipeline.run`: :func:`run`, the whole run in order;
- services: :mod:`~purer.pipeline.checkpoints`, :mod:`~purer.pipeline.signals` (Ctrl-C, SIGTERM),
  :mod:`~purer.pipeline.tracker` (logging), :mod:`~purer.pipeline.pictures`, :mod:`~purer.pipeline.rundir`
  (the output folder) and :mod:`~purer.pipeline.distributed` (several processes).

Example:
    >>> from purer.yaml_config import load_config
    >>> results = run(load_config(RunConfig, "recipes/configs/default.yaml"))   # doctest: +SKIP
"""
from .build import best_start_teacher, build_bank, build_learner, load_meta_learner, load_zoo, zoo_path
from .checkpoints import CHECKPOINTED, checkpointed_state, latest_checkpoint
from .eci import ECI, meta_train_eci
from .metatest import evaluate_purer, evaluate_split
from .report import results_table
from .run import run
from .run_config import DataConfig, EvalConfig, MetaConfig, RunConfig, RunError, ZooConfig
from .signals import StopSignals, Stopped

__all__ = ["run", "RunConfig", "RunError", "DataConfig", "ZooConfig", "MetaConfig", "EvalConfig", "build_bank",
           "best_start_teacher", "build_learner", "load_meta_learner", "load_zoo", "zoo_path", "CHECKPOINTED",
           "checkpointed_state", "latest_checkpoint", "ECI", "meta_train_eci", "evaluate_purer", "evaluate_split", "results_table",
           "StopSignals", "Stopped"]
