"""The `wan-i2v` command: the parser and the dispatch to the commands (``wan_i2v.commands``)."""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import signal
import sys
import warnings
from contextlib import contextmanager
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The modules imported here are torch-free: --version, --help and `cache status` never import torch
# (the commands that run models import it, in their own modules, imported when they run).
from wan_i2v.cache import add_cache_parser
from wan_i2v.commands import DEFAULT_OUTPUT, DEMO_FILE, is_main
from wan_i2v.config import add_sampling_flags
from wan_i2v.errors import INTERRUPTED, TERMINATED, Terminated, WanError, is_out_of_memory, on_the_command_line, stop_on_sigterm
from wan_i2v.options import add_options, model_argument

DEMO_PROMPT = "A small paper boat drifts on a calm pond."
# The official generate.py's --task values of the models run here.
OFFICIAL_TASKS = {"i2v-A14B": "i2v-a14b", "ti2v-5B": "ti2v-5b"}


def _command(name: str):
    """The handler of the command in ``wan_i2v.commands.<name>``, its module imported when it runs."""

    def handler(args) -> int:
        return import_module(f"wan_i2v.commands.{name}").run(args)

    return handler


@contextmanager
def _one_line_warnings():
    """Warnings (a truncated prompt, ...) as one line each, like the errors, and only from rank 0
    of a multi-process run, which says each once."""
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        if not is_main():
            warnings.simplefilter("ignore")
        yield


def _warning_line(message, *_args, **_kwargs) -> None:
    print(f"wan-i2v: warning: {message}", file=sys.stderr)


def _task(text: str) -> str:
    """--task: an official task run here, as the model it names (``--model``'s value)."""
    if text not in OFFICIAL_TASKS:
        raise argparse.ArgumentTypeError(f"task {text!r} is not run here: wan-i2v runs {' and '.join(OFFICIAL_TASKS)}")
    return model_argument(OFFICIAL_TASKS[text])


def _official_bool(text: str) -> bool:
    """True or False as the official script's str2bool reads them."""
    meaning = {"yes": True, "true": True, "t": True, "y": True, "1": True, "no": False, "false": False, "f": False, "n": False, "0": False}.get(text.lower())
    if meaning is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not True or False")
    return meaning


def _version() -> str:
    try:
        return version("wan-i2v")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


class _Formatter(argparse.HelpFormatter):
    def _format_args(self, action, default_metavar):
        # One or two values (LOW [HIGH]), not argparse's "LOW [HIGH ...]" that suggests more.
        if action.nargs == "+" and isinstance(action.metavar, tuple) and len(action.metavar) == 2:
            return "%s [%s]" % action.metavar
        return super()._format_args(action, default_metavar)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=_Formatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        # The prefix of every other error, and the help of the command that was typed.
        self.exit(2, f"wan-i2v: error: {message} (see `{self.prog} --help`)\n")


def official_options(p) -> None:
    """The official generate.py's I2V options that ours do not already spell its way, so that its
    command lines run unchanged (README: The official command lines)."""
    off = p.add_argument_group("the official generate.py's options")
    off.add_argument("--task", dest="model", type=_task, default=argparse.SUPPRESS, help=f"{' or '.join(OFFICIAL_TASKS)}: --model")
    off.add_argument("--offload_model", type=_official_bool, default=None, metavar="True|False",
                     help="True: --offload experts; False: no offload asked (the plan still offloads what does not fit)")
    off.add_argument("--convert_model_dtype", action="store_true", help="--dtype bf16")
    off.add_argument("--t5_cpu", action="store_true", help="accepted; the plan places the text encoder (README: The official command lines)")
    off.add_argument("--t5_fsdp", "--dit_fsdp", dest="fsdp", action="store_true", help="--fsdp (it shards both)")
    off.add_argument("--ulysses_size", dest="ulysses", type=int, metavar="U", help="--ulysses")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="wan-i2v", description="Wan2.2-I2V-A14B image-to-video.")
    parser.add_argument("--version", action="version", version=f"wan-i2v {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def dry_run_option(p):
        p.add_argument("--dry-run", action="store_true", help="print the plan and per-GPU memory estimate, then exit")

    gen = sub.add_parser("generate", help="make a video from an image and a prompt")
    gen.add_argument("--image", default=None, help="the first frame: a PNG, JPEG or WebP file (ti2v-5b: optional, without one text-to-video)")
    gen.add_argument("--last-image", default=None, metavar="FILE",
                     help="the last frame (optional): the video goes from --image to it. It is resized to the video's size as the first is; "
                          "of another aspect ratio than the first, it is scaled to cover the video and center-cropped")
    add_sampling_flags(gen, frame_num=None, steps=None, leave_out=("distilled",))  # a run option (it merges the 4-step LoRAs too)
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    gen.add_argument("--save-file", "--save_file", default=None,
                     help=f"an .mp4 file (default {DEFAULT_OUTPUT}, or {Path(DEFAULT_OUTPUT).stem}-N.mp4 when that exists)")
    gen.add_argument("--save-latents", default=None, help="also keep the latents here (`wan-i2v decode` re-decodes them)")
    add_options(gen)
    official_options(gen)
    dry_run_option(gen)
    gen.set_defaults(func=_command("generate"))

    ext = sub.add_parser("extend", help="continue a video with new clips, each conditioned on the last frames before it")
    ext.add_argument("video", help="the mp4 to continue: the new clips are at its size (sides multiples of 16) and frame rate")
    add_sampling_flags(ext, leave_out=("size", "height", "width", "fps", "distilled"))  # the size: the video's own; --distilled: a run option
    ext.add_argument("--quiet", action="store_true", help="no progress bars")
    ext.add_argument("--context-frames", type=int, default=5,
                     help="the video's last frames each clip is conditioned on and starts with (left out of the join): 4m+1 (default 5)")
    ext.add_argument("--extend-times", type=int, default=1, help="how many clips to add, each after the one before (default 1); clip i takes --seed + i")
    ext.add_argument("--save-file", "--save_file", default=None, help="the .mp4 to write: the video, then the new frames (default VIDEO-extended.mp4)")
    add_options(ext)
    dry_run_option(ext)
    ext.set_defaults(func=_command("extend"))

    srv = sub.add_parser("serve", help="an HTTP server (OpenAI videos API, web page) with a job queue that survives restarts")
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this machine only; another needs --token)")
    srv.add_argument("--port", type=int, default=8000, help="default 8000")
    srv.add_argument("--state-dir", default=None, help="the job queue, uploads and videos (default $WAN_I2V_HOME/server): keep it on a persistent volume")
    srv.add_argument("--queue", default=None, metavar="URL", help="a PostgreSQL database (postgresql://...) that servers on several machines share, "
                     "--state-dir then being a folder they all mount (default: $WAN_I2V_QUEUE, else SQLite in --state-dir: the servers of one machine)")
    srv.add_argument("--token", default=None, help="clients must send Authorization: Bearer TOKEN (default: $WAN_I2V_TOKEN; none on 127.0.0.1)")
    srv.add_argument("--allowed-hosts", nargs="+", default=[], metavar="NAME",
                     help="the names clients reach the server by, besides IP addresses and localhost (other Host names are refused: "
                     "DNS rebinding); * allows any, for a proxy that checks them")
    srv.add_argument("--token-file", default=None, metavar="FILE", help="read --token from the first line of FILE (it stays out of ps)")
    srv.add_argument("--tokens", default=None, metavar="FILE", help="one token per client, a line each: NAME TOKEN, or NAME TOKEN admin "
                     "(each client sees only its own jobs; an admin sees all); not with --token")
    srv.add_argument("--max-queue", type=int, default=1000, help="jobs that may wait; more are refused with 429 (default 1000)")
    srv.add_argument("--max-upload-mb", type=float, default=50, help="the largest image accepted, in MiB (default 50)")
    jobs = srv.add_argument_group("each job's defaults (a request may set its own)")
    add_sampling_flags(jobs, jobs=True, frame_num=None, steps=None, leave_out=("distilled",))  # (None: the model's)
    srv.set_defaults(func=_command("serve"))
    add_options(srv)

    dec = sub.add_parser("decode", help="decode saved latents to mp4 again")
    dec.add_argument("latents", help="a file written by `generate --save-latents` (or left by a run stopped while decoding)")
    dec.add_argument("--save-file", "--save_file", required=True, help="the .mp4 to write")
    dec.add_argument("--overwrite", action="store_true", help="replace --save-file if it exists (default: refuse)")
    add_options(dec, only=("ckpt_dir", "cache_dir", "device", "decode_dtype"))
    dec.add_argument("--quiet", action="store_true", help="no progress bar")
    dec.set_defaults(func=_command("decode"))

    demo = sub.add_parser("demo", help="run the whole pipeline on a built-in tiny random model on the CPU")
    add_sampling_flags(demo, frame_num=17, steps=12, prompt=DEMO_PROMPT, seed=0, leave_out=("size", "shift", "height", "width"))
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--max-area", type=int, default=160 * 96, help=argparse.SUPPRESS)
    demo.add_argument("--save-file", default=None, help=f"default {DEMO_FILE}, or {Path(DEMO_FILE).stem}-N.mp4 when that exists")
    add_options(demo, only=("model",))
    demo.set_defaults(func=_command("demo"))

    cmp = sub.add_parser("compare", help="PSNR and SSIM of a video against a reference, per frame and overall (what a fast mode costs)")
    cmp.add_argument("reference", help="the video of the exact path (an .mp4)")
    cmp.add_argument("video", help="the video to measure against it, of the same size and frame count")
    cmp.set_defaults(func=_command("compare"))

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a tiny random checkpoint in the official layout")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0, help="the random weights' seed (default 0)")
    add_options(tiny, only=("model",))
    tiny.set_defaults(func=_command("make_tiny"))

    add_cache_parser(sub)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # pointed at the typed command's --help, where the options are
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    stop_on_sigterm()
    try:
        try:
            # (inside the handlers below: a Ctrl-C during the imports that reading the options makes is an interrupt too)
            args = _parse(argv)
        except SystemExit as exit_:  # --help, or argparse's one-line error
            return exit_.code
        with _one_line_warnings(), on_the_command_line():
            return args.func(args)
    except WanError as exc:
        rank = "" if is_main() else f"(rank {os.environ.get('RANK')}) "
        print(f"wan-i2v: error: {rank}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        # Ctrl-C reaches the launcher's whole process group, and its ranks' ends can raise it once
        # more here: a second interrupt during the exit would end the process by the signal instead of 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if is_main():  # (under torchrun every rank stops: rank 0 says so)
            print(f"wan-i2v: {'stopped by SIGTERM' if isinstance(stop, Terminated) else 'interrupted'}", file=sys.stderr)
        return TERMINATED if isinstance(stop, Terminated) else INTERRUPTED
    except MemoryError:
        print("wan-i2v: error: out of host memory (try a smaller --size or fewer --frame-num)", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"wan-i2v: error: no space left on the disk{where} (free some space; a run's saved state lets the same command resume)", file=sys.stderr)
        return 2
    except Exception as exc:
        if is_out_of_memory(exc):
            print("wan-i2v: error: out of GPU memory (try --offload, --size 480P or fewer --frame-num)", file=sys.stderr)
            return 2
        raise


def run() -> None:
    """The program (the `wan-i2v` command, ``python -m wan_i2v``): ``main``'s exit code. After Ctrl-C
    the process ends at once with 130: CPython can remember an interrupt that struck while modules
    were being imported as unhandled, and would then end the process by SIGINT at exit (seen with
    ``python -m wan_i2v.cli`` interrupted while loading), which shells and launchers read differently."""
    code = main()
    if code in (INTERRUPTED, TERMINATED):
        atexit._run_exitfuncs()  # the exit's cleanup (multiprocessing's queues and semaphores), then the code
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
