"""PURER end to end: ECI meta-training on a model zoo's pseudo episodes, meta-test with and without ICFIL.

    accelerate launch recipes/purer.py                      # the embedded default (glyphs, a 12-model Conv4 zoo)
    python recipes/purer.py --config recipes/configs/sh-mix.yaml meta.train.iterations=500
    python recipes/purer.py --resume                        # continue an interrupted run in the same output_dir
    python recipes/purer.py --overwrite                     # start again in an output_dir that holds a run

Any config key can be set as ``key=value`` (dotted for nested keys); see ``purer.pipeline.RunConfig``.
Outputs in ``output_dir``: results.json, results.md, config.yaml, meta_learner/ (model.safetensors +
config.json), pictures/*.png, logs/ (TensorBoard), checkpoints/.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

# This file is named like the package; drop its folder from the import path so that
# `import purer` finds the library, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from purer import PurerWarning  # noqa: E402
from purer.yaml_config import ConfigError, load_config  # noqa: E402
from purer.pipeline import RunConfig, RunError, Stopped, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a YAML file of RunConfig keys (recipes/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of another run in output_dir (else such a folder is refused)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. meta.shot=5")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may come before and after flags
    warnings.showwarning = _show_warning
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
        run(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    except (ConfigError, RunError) as e:
        print(f"purer: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:  # a signal: the work so far is saved
        print(f"purer: stopped ({e.signame}); the work so far is saved: continue with --resume", file=sys.stderr)
        return 128 + getattr(signal, e.signame, signal.SIGINT)
    except KeyboardInterrupt:
        return 130
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """purer's own warnings as one line, like its errors; others as Python shows them."""
    if issubclass(category, PurerWarning):
        print(f"purer: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


if __name__ == "__main__":
    sys.exit(main())
