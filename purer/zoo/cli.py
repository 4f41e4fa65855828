"""``purer-zoo`` (also ``python -m purer.zoo``): build, register, list, inspect, verify and remove zoo models.

Every user mistake ends in one line ``purer-zoo: error: ...`` on stderr and exit
code 2; ``verify`` exits 1 when the zoo has problems. Writes are atomic (see
:mod:`purer.zoo.store`), so an interrupted ``pretrain`` keeps the models that
finished and resumes when rerun with the same ``--zoo``, and ``register
--manifest`` registers every row or none (see :mod:`purer.zoo.ingest`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch

from ..yaml_config import load_config
from .ingest import ModelSource, parse_floats, parse_names, read_manifest, register_models
from .pretrain import MIX, SUBSET_MODES, PretrainConfig, pretrain_zoo
from .store import Zoo, default_zoo_dir

PROG = "purer-zoo"


def _floats(text: str) -> list[float]:
    try:
        return parse_floats(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"width\": 64}}', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Manage PURER model zoos on disk.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    zoo_opt = argparse.ArgumentParser(add_help=False)
    zoo_opt.add_argument("--zoo", type=Path, help="zoo directory")

    p = sub.add_parser("pretrain", parents=[zoo_opt], help="train a zoo from a spec file and/or flags",
                       description="Train teachers on class subsets of a dataset's meta-train split. A spec "
                                   "file sets the same keys (underscored); flags override it. Without --zoo, "
                                   "a spec's zoo goes to model_zoo/zoos/<spec name>.")
    p.add_argument("--spec", type=Path, help="YAML file of PretrainConfig keys (model_zoo/specs/*.yaml)")
    p.add_argument("--dataset")
    p.add_argument("--data-root")
    p.add_argument("--num-models", type=int)
    p.add_argument("--classes-per-model", type=int)
    p.add_argument("--arch", help=f"registered architecture or 'mix' ({'+'.join(MIX)})")
    p.add_argument("--arch-args", type=_json_object, help='architecture arguments as JSON, e.g. \'{"width": 32}\'')
    p.add_argument("--subsets", choices=SUBSET_MODES)
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small teachers train fastest on one thread, and "
                        "oversubscribed cores slow everything down on a shared machine)")
    p.add_argument("--device", default=None,
                   help="where to train: cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("register", parents=[zoo_opt], help="add existing checkpoints to a zoo",
                       description="Add one checkpoint (WEIGHTS: .safetensors, a torch state dict read with "
                                   "weights_only=True, or a model folder with its config.json), or every row of "
                                   "--manifest (all or none). Tensor names may be purer's or the library's own "
                                   "(tv:, timm:, a user's class). Without --mean/--std the checkpoint's own config "
                                   "must hold them (timm, model folders); --mean 0 --std 1 states 'none'.")
    p.add_argument("weights", type=Path, nargs="?", help="weights file or model folder")
    p.add_argument("--manifest", type=Path, help="a .csv or .yaml file, one model per row: file, id, arch, "
                                                 "arch_args, class_ids, in_channels, image_size, mean, std, dataset")
    p.add_argument("--arch", help="conv4, resnet10, resnet12, resnet18, tv:<name>, timm:<name>, "
                                  "package.module:Class or path/to/file.py:Class")
    p.add_argument("--arch-args", type=_json_object)
    p.add_argument("--class-ids", help="comma-separated class names, in output order")
    p.add_argument("--id", dest="model_id", help="model id (default: the file's or folder's name)")
    p.add_argument("--in-channels", type=int, help="input channels (default: read from the weights)")
    p.add_argument("--image-size", type=int, help="side of the square training images")
    p.add_argument("--mean", type=_floats, help="per-channel mean of [0, 1] inputs, e.g. 0.5,0.5,0.5")
    p.add_argument("--std", type=_floats, help="per-channel std, e.g. 0.25,0.25,0.25")
    p.add_argument("--dataset")

    p = sub.add_parser("list", parents=[zoo_opt], help="list the models of a zoo")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p = sub.add_parser("inspect", parents=[zoo_opt], help="show one model's config as JSON")
    p.add_argument("model_id", metavar="ID")
    sub.add_parser("verify", parents=[zoo_opt], help="check files, checksums and weights; exit 1 on a problem")
    p = sub.add_parser("remove", parents=[zoo_opt], help="delete one model")
    p.add_argument("model_id", metavar="ID")
    return parser


def _zoo_path(args: argparse.Namespace) -> Path:
    if args.zoo is not None:
        return args.zoo
    if getattr(args, "spec", None) is not None:
        return default_zoo_dir(args.spec.stem)
    raise ValueError("--zoo DIR is required" + (" (or --spec, whose zoo goes to model_zoo/zoos/<spec name>)"
                                                 if args.command == "pretrain" else ""))


def _pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.spec)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
             if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **flags)
    if args.threads < 1:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown or absent device
        raise ValueError(f"--device {device}: {' '.join(str(e).split())[:200]}") from None
    zoo = Zoo(_zoo_path(args), create=True)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"pre-training {cfg.num_models} {cfg.arch} model(s) on {cfg.dataset} into {zoo.path} ({device})")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        ids = pretrain_zoo(cfg, zoo, progress=not args.quiet, log=log, device=device)
    finally:
        torch.set_num_threads(threads)
    accs = [zoo.config(i).metrics.get("heldout_acc", float("nan")) for i in ids]
    print(f"{zoo.path}: {len(ids)} model(s); held-out accuracy median {statistics.median(accs):.3f}, "
          f"min {min(accs):.3f}")
    return 0


# The flags that describe one model (a manifest sets them per row), by their argparse name.
_PER_MODEL = {"arch": "--arch", "arch_args": "--arch-args", "class_ids": "--class-ids", "model_id": "--id",
              "in_channels": "--in-channels", "image_size": "--image-size", "mean": "--mean", "std": "--std",
              "dataset": "--dataset"}


def _register(args: argparse.Namespace) -> int:
    zoo = _zoo_path(args)
    if args.manifest is not None:
        if args.weights is not None:
            raise ValueError("give WEIGHTS or --manifest, not both")
        flags = [flag for name, flag in _PER_MODEL.items() if getattr(args, name) is not None]
        if flags:
            raise ValueError(f"{', '.join(flags)} describe one model; with --manifest, set them per row")
        sources = read_manifest(args.manifest)
    elif args.weights is None:
        raise ValueError("give a weights file or model folder, or --manifest models.csv")
    else:
        for name in ("in_channels", "image_size"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
        sources = [ModelSource(args.weights, id=args.model_id, arch=args.arch, arch_args=args.arch_args,
                               class_ids=parse_names(args.class_ids) if args.class_ids is not None else None,
                               in_channels=args.in_channels, image_size=args.image_size, mean=args.mean,
                               std=args.std, dataset=args.dataset)]
    register_models(zoo, sources, log=print, warn=lambda line: print(f"{PROG}: warning: {line}", file=sys.stderr))
    return 0


def _list(args: argparse.Namespace) -> int:
    entries = Zoo(_zoo_path(args)).entries()
    if args.json:
        print(json.dumps(entries, indent=2, ensure_ascii=False))
        return 0
    wid = max([16] + [len(e["id"]) for e in entries])
    warch = max([10] + [len(str(e.get("arch", "?"))) for e in entries])
    print(f"{'id':<{wid}} {'arch':<{warch}} {'classes':>7} {'input':>9} {'heldout':>7}  dataset")
    for e in entries:
        acc = e.get("heldout_acc")
        shape = f"{e.get('in_channels', '?')}x{e.get('image_size', '?')}"
        print(f"{e['id']:<{wid}} {e.get('arch', '?'):<{warch}} {len(e.get('class_ids', [])):>7} {shape:>9} "
              f"{'-' if acc is None else f'{acc:.3f}':>7}  {e.get('dataset', '')}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    print(json.dumps(Zoo(_zoo_path(args)).describe(args.model_id), indent=2, ensure_ascii=False))
    return 0


def _verify(args: argparse.Namespace) -> int:
    zoo = Zoo(_zoo_path(args))
    problems = zoo.verify(warn=lambda line: print(f"{PROG}: warning: {line}", file=sys.stderr))
    for p in problems:
        print(f"{PROG}: verify: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"{zoo.path}: {len(zoo)} model(s) verified")
    return 0


def _remove(args: argparse.Namespace) -> int:
    zoo = Zoo(_zoo_path(args))
    zoo.remove(args.model_id)
    print(f"removed {args.model_id} from {zoo.path}")
    return 0


COMMANDS = {"pretrain": _pretrain, "register": _register, "list": _list, "inspect": _inspect,
            "verify": _verify, "remove": _remove}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and its error
        return int(e.code or 0)
    try:
        return COMMANDS[args.command](args)
    except KeyError as e:
        message = e.args[0] if e.args else str(e)
    except BrokenPipeError:
        # The reader stopped reading (`purer-zoo inspect ... | head`): it has what it wanted.  Later
        # writes, including the flush at exit, go nowhere instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, OSError) as e:
        message = str(e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished models stay in the zoo, rerun the same command to resume",
              file=sys.stderr)
        return 130
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
