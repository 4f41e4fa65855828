"""The PURER pipeline: zoo -> teachers -> bank -> episodes -> meta-learner -> calibrated prediction.

``recipes/purer.py`` is a thin command line around :func:`run`.  The stages, one file each:

- :mod:`~purer.pipeline.run_config`: the run's config sections (:class:`RunConfig`) and :class:`RunError`;
- :mod:`~purer.pipeline.build`: the zoo's teachers (pre-trained on first use), the bank, the learner;
- :mod:`~purer.pipeline.eci`: ECI meta-training and its checkpointed state;
- :mod:`~purer.pipeline.metatest`: meta-test with and without ICFIL, and the baselines beside it;
- :mod:`~purer.pipeline.report`: results.json and the results table;
- :mod:`~purer.pipeline.distributed`: the collective operations of a multi-process run;
- :mod:`~purer.pipeline.run`: :func:`run`, the whole run in order.

Example:
    >>> from purer.yaml_config import load_config
    >>> results = run(load_config(RunConfig, "recipes/configs/default.yaml"))   # doctest: +SKIP
"""
from .build import build_bank, build_learner, load_meta_learner, load_zoo, zoo_path
from .run_config import DataConfig, EvalConfig, MetaConfig, RunConfig, RunError, ZooConfig
from .eci import CHECKPOINTED, DeferredInterrupt, checkpointed_state, meta_train_eci
from .metatest import evaluate_purer, evaluate_split
from .report import results_table
from .run import run

__all__ = ["run", "RunConfig", "RunError", "DataConfig", "ZooConfig", "MetaConfig", "EvalConfig", "build_bank",
           "build_learner", "load_meta_learner", "load_zoo", "zoo_path", "CHECKPOINTED", "DeferredInterrupt",
           "checkpointed_state", "meta_train_eci", "evaluate_purer", "evaluate_split", "results_table"]
