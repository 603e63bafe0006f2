"""`wan-i2v cache ...`: the argparse side of the cache commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wan_i2v.cache import commands
from wan_i2v.cache.hub_files import LIGHTNING_COMMAND
from wan_i2v.cache.layout import SPEC, cache_root, model_files, resolve_checkpoint_dir
from wan_i2v.cache.manifest import MANIFEST_NAME
from wan_i2v.errors import INTERRUPTED, TERMINATED, Terminated, WanError
from wan_i2v.models.spec import SPECS, ModelSpec, spec_for
from wan_i2v.options import model_argument

_MODELS = " or ".join(spec.aliases[0] for spec in SPECS.values())

_CACHE_DIR_HELP = "cache root (default: $WAN_I2V_HOME, else the Hugging Face hub cache: $HF_HUB_CACHE or $HF_HOME/hub)"


def add_cache_parser(subparsers) -> argparse.ArgumentParser:
    """Add `cache` and its sub-commands; each leaf sets `func(args) -> exit code`."""
    cache = subparsers.add_parser(
        "cache", help=f"download, check and relocate the models' checkpoints ({SPEC.repo_id} unless --model says another)",
        description=_cache_description(),
    )
    _add_cache_dir(cache)
    leaves = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)

    quick = leaves.add_parser("quick", help="download the files image-to-video needs, resuming partial downloads")
    quick.add_argument("--source", choices=("hf", "modelscope"), default="hf", help="where to download from (default: hf)")
    quick.add_argument("--lightning", action="store_true",
                       help="instead of the model, lightx2v's 4-step LoRA pair (Wan2.2-Lightning, from the hub), which `generate --distilled` merges")
    _add_model(quick, f"the model to download: {_MODELS} (default {SPEC.aliases[0]})")
    quick.set_defaults(func=_quick)

    status = leaves.add_parser(
        "status", help="table of the required files, from the disk alone (works offline); exit code 0 only when all are there and read",
        description="Check each file image-to-video needs without the network: there or missing, its size (compared with the "
        f"published one where `quick` or `verify` left a {MANIFEST_NAME}), and whether its header reads; then a line per "
        "4-step LoRA of `generate --distilled` (`quick --lightning` fetches them).",
    )  # fmt: skip
    status.add_argument("--ckpt-dir", type=Path, help="check this checkpoint folder instead of the cache")
    _add_model(status, f"check this model's files: {_MODELS} (default: each model the cache has; with --ckpt-dir, the checkpoint's)", None)
    status.set_defaults(func=lambda args: commands.status(_root(args), args.ckpt_dir, _model(args)))

    verify = leaves.add_parser("verify", help="check sizes, and with --full the published SHA-256 hashes")
    verify.add_argument("--full", action="store_true", help="hash every file (reads the whole checkpoint)")
    verify.add_argument("--ckpt-dir", type=Path, help="check this checkpoint folder instead of the cache")
    _add_model(verify, f"check this model's files: {_MODELS} (default: each model the cache has; with --ckpt-dir, the checkpoint's)", None)
    verify.set_defaults(func=lambda args: commands.verify(_root(args), args.ckpt_dir, args.full, _model(args)))

    path = leaves.add_parser("path", help="print the checkpoint directory, for --ckpt-dir \"$(wan-i2v cache path)\"")
    _add_model(path, f"this model's checkpoint: {_MODELS} (default {SPEC.aliases[0]})")
    path.set_defaults(func=_path)

    move = leaves.add_parser("move", help="move the cache to another disk, e.g. a persistent volume")
    move.add_argument("dest", type=Path, metavar="DEST", help="the new cache root")
    move.add_argument("--link", action="store_true", help="leave a symlink at the old place")
    _add_model(move, f"move this model's repository: {_MODELS} (default {SPEC.aliases[0]})")
    move.set_defaults(func=lambda args: commands.move(_root(args), args.dest, args.link, _model(args)))

    for leaf in (quick, status, verify, path, move):
        _add_cache_dir(leaf)
    return cache


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the sub-command, and an absent one never overwrites a given one.
    parser.add_argument("--cache-dir", type=Path, default=argparse.SUPPRESS, help=_CACHE_DIR_HELP)


def _add_model(parser: argparse.ArgumentParser, help: str, default: str | None = SPEC.name) -> None:
    parser.add_argument("--model", type=model_argument, default=default, metavar="MODEL", help=help)


def _model(args: argparse.Namespace) -> ModelSpec | None:
    return None if args.model is None else spec_for(args.model)


def _root(args: argparse.Namespace) -> Path:
    return cache_root(getattr(args, "cache_dir", None))


def _quick(args: argparse.Namespace) -> int:
    if args.lightning and args.source != "hf":
        raise WanError("the 4-step LoRAs are on the Hugging Face hub only", "leave out --source")
    try:
        return commands.quick_lightning(_root(args), _model(args)) if args.lightning else commands.quick(_root(args), args.source, _model(args))
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        terminated = isinstance(stop, Terminated)
        again = LIGHTNING_COMMAND if args.lightning else model_files(args.model).fetched_by
        print(f"\n{'stopped by SIGTERM' if terminated else 'interrupted'}; {again} resumes where it stopped", file=sys.stderr)
        return TERMINATED if terminated else INTERRUPTED


def _path(args: argparse.Namespace) -> int:
    print(resolve_checkpoint_dir(_root(args), _model(args)))
    return 0


def _cache_description() -> str:
    return (
        f"Manage the models' checkpoints, one hub repository each ({SPEC.repo_id} unless --model names another). "
        "The cache root is --cache-dir, else $WAN_I2V_HOME, else the "
        "Hugging Face hub cache, so a snapshot downloaded with huggingface-cli is used as it is. "
        "Downloads go to temporary files renamed when complete and verified; `quick` resumes them."
    )
