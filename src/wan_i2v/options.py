"""The run options: one frozen dataclass whose fields each carry their command-line flag (with the
official script's spelling where it has one), help, choices and default. The CLI's parser is made
from it (``add_options``) and read back into it (``options_from``); the Python API takes it
(``RunSession.open``, ``I2VPipeline.from_pretrained``); ``ExecutionPlan.for_device`` resolves it.

No torch here: ``--help`` is built from this module."""

from __future__ import annotations

import argparse
import enum
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from wan_i2v.errors import WanError, command_line, option as option_name
from wan_i2v.models.spec import DEFAULT_SPEC, ModelSpec, SPECS, spec_for
from wan_i2v.transforms.step_cache_config import StepCacheConfig


class Offload(enum.Enum):
    """Where the experts wait when they are not running (``--offload``)."""

    NONE = "none"  # on the GPU, both
    EXPERTS = "experts"  # one expert at a time on the GPU (with FSDP: every shard in pinned host memory)
    BLOCKS = "blocks"  # each expert's blocks streamed from pinned host memory (one GPU)

    @classmethod
    def parse(cls, value) -> "Offload":
        """An Offload from what users write: None/False (none), True (experts), or a mode's name."""
        if isinstance(value, cls):
            return value
        if value is None or value is False:
            return cls.NONE
        if value is True:
            return cls.EXPERTS
        try:
            return cls(value)
        except ValueError:
            raise WanError(f"unknown offload mode {value!r}", f"choose one of {', '.join(m.value for m in cls)}") from None

    @property
    def flag(self) -> str | None:
        """The placement's name for it (None when the experts stay on the GPU)."""
        return None if self is Offload.NONE else self.value


# The precisions a run takes by name, with the torch dtype each names (resolved where torch is).
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
DEVICE_FORM = re.compile(r"cpu|cuda(:\d+)?")


def dtype_name(value) -> str | None:
    """A precision's name (bf16, fp32) from its name or a torch dtype (``torch.bfloat16``); None stays None."""
    if value is None or value in DTYPES:
        return value
    name = {torch_name: short for short, torch_name in DTYPES.items()}.get(str(value).removeprefix("torch."))
    if name is None:
        raise WanError(f"dtype {value} is not one wan-i2v runs in", f"use one of {', '.join(DTYPES)}")
    return name


# -- the flags' value types (argparse's one-line errors) ------------------------------------------


def device_argument(text: str) -> str:
    """--device: cuda, cuda:N or cpu, checked as the arguments are read (mps, tpu and typos are one line)."""
    if not DEVICE_FORM.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device wan-i2v runs on: use cuda, cuda:N or cpu")
    return text


def gib_argument(text: str) -> float:
    """--gpu-memory, --host-memory: a positive number of GiB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of GiB: {text!r}") from None
    if not 0 < value < 2**40:  # refuses nan and inf too
        raise argparse.ArgumentTypeError(f"{text} GiB: give a positive number of GiB, such as 24")
    return value


class _LoraFiles(argparse.Action):
    """--lora, --lora-high, --lora-low: each file noted under its flag's experts, in the order given
    per flag (``options_from`` puts a flag's for both experts before an expert's own)."""

    def __call__(self, parser, namespace, value, option_string=None):
        given = {key: list(files) for key, files in (getattr(namespace, self.dest) or {}).items()}
        given.setdefault(self.const, []).append(value)
        setattr(namespace, self.dest, given)


def _lora_files(given: dict | None) -> dict | None:
    """The LoRA files by the flags' keys: --lora's under ``EVERY_EXPERT`` (``expert_loras`` gives them to the model's experts)."""
    return given or None


EVERY_EXPERT = "both"  # --lora's key: the files every expert of the model takes


def expert_loras(loras, spec: ModelSpec | str = DEFAULT_SPEC):
    """``loras`` by ``spec``'s expert names: the files under ``EVERY_EXPERT`` (--lora's) go to every expert,
    before the expert's own; anything else (a ``Loras``, None) is returned as it is."""
    if not isinstance(loras, dict) or EVERY_EXPERT not in loras:
        return loras
    every = loras[EVERY_EXPERT]
    named = {name: files for name, files in loras.items() if name != EVERY_EXPERT}
    return {**named, **{expert.name: [*every, *named.get(expert.name, [])] for expert in spec_for(spec).experts}}


def model_argument(text: str) -> str:
    """--model, --task: a registered model by its name or alias (the official ``ti2v-5B``), as its spec's name."""
    try:
        return spec_for(text).name
    except WanError:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}: choose one of {', '.join(alias for spec in SPECS.values() for alias in spec.aliases)}") from None


class _StepCacheSetting(argparse.Action):
    """--step-cache, --step-cache-blocks, --step-cache-max: each sets its part of the one step-cache setting."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), **dict(zip(self.const, value if len(self.const) > 1 else (value,)))})


def _block_counts(text: str) -> tuple[int, int]:
    """--step-cache-blocks F,B: the first and the last blocks that always run."""
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not F,B: give the first and the last blocks that always run, such as 1,0")
    return int(parts[0]), int(parts[1])


def _step_cache(given: dict | None) -> StepCacheConfig | None:
    """The step cache's setting from its flags (None: none given, the cache is off)."""
    return StepCacheConfig(**given) if given else None


# -- fields that carry their flags ----------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a field: its names, help, and argparse's other keywords (type, choices, action, ...)."""

    names: tuple[str, ...]
    help: str
    arguments: dict


def option(default, *names: str, help: str, group: str | None = None, more: tuple[Flag, ...] = (), read=None, **arguments):
    """A field whose flag is ``names`` (the first is ours, the others the official script's spellings),
    in the help ``group`` if given; ``more``: further flags that set it too; ``read``: turns what the
    flags left in the Namespace into the field's value."""
    flags = (Flag(names, help, arguments), *more)
    return field(default=default, metadata={"flags": flags, "group": group, "read": read})


SEVERAL_GPUS = "several GPUs (see README: Several GPUs)"
STEP_CACHE = "the step cache (see README: The step cache)"
DECODE_DTYPE_HELP = "the VAE decode's precision: fp32 as the official code (default), or bf16: about twice as fast in half the memory, ~1e-2 from fp32"


@dataclass(frozen=True)
class RunOptions:
    """What the user asks of a run: where the checkpoint is, the device, the precision, the memory and
    the GPUs. None: chosen for the machine."""

    ckpt_dir: str | Path | None = option(None, "--ckpt-dir", "--ckpt_dir", help="default: the cache's checkpoint (`wan-i2v cache path`)")
    model: str | ModelSpec | None = option(
        None, "--model", type=model_argument, metavar="MODEL",
        help=f"the model: {' or '.join(alias for spec in SPECS.values() for alias in spec.aliases)} (the official ti2v-5B and i2v-A14B too); "
             "default: the checkpoint's (its config.json says it), else i2v-a14b",
    )  # fmt: skip
    cache_dir: str | Path | None = option(None, "--cache-dir", help="the cache to find the checkpoint in (default: $WAN_I2V_HOME, else the Hugging Face cache)")
    offload: Offload | None = option(
        None, "--offload", nargs="?", const="experts", choices=["experts", "blocks"],
        help="experts (the default when given bare): only the active expert on the GPU, for 80 GB cards; "
             "blocks: each expert's blocks streamed from the checkpoint, for 24-48 GB cards (default: chosen to fit the GPU's and the host's memory)",
    )  # fmt: skip
    # {expert name: [path, (path, strength), ...], ...} or a Loras: merged into the experts as they load
    loras: object = option(
        None, "--lora", action=_LoraFiles, const="both", metavar="PATH[:STRENGTH]",
        help="a LoRA .safetensors for both experts (strength 1 unless given): a file, or one on the Hugging Face hub as "
             "hf://OWNER/REPO/PATH or hf://OWNER/REPO@REVISION/PATH (fetched into the cache once); repeat for more, applied in order",
        # One flag per expert of the models with several (--lora-high, --lora-low for the A14B).
        more=tuple(Flag((f"--lora-{name}",), f"a LoRA for {expert} only", {"action": _LoraFiles, "const": name, "metavar": "PATH[:STRENGTH]"})
                   for name, expert in {expert.name: expert for spec in SPECS.values() if len(spec.experts) > 1 for expert in spec.experts}.items()),
        read=_lora_files,
    )  # fmt: skip
    distilled: bool = option(
        False, "--distilled", action="store_true",
        help="the distilled recipe of 4 steps: the LoRAs given with --lora*, else the pair that `cache quick --lightning` put in the cache, "
             "merged into the experts (without any, a checkpoint of the A14B's shapes is refused; one of other shapes, such as a tiny "
             "test model, runs as it is), sampled with euler, 4 steps, guide scale 1 and shift 5, each overridable",
    )  # fmt: skip
    lightning: bool = option(True, "--no-lightning", action="store_false",
                             help="with --distilled: no LoRAs from the cache, for a checkpoint that is distilled itself")  # fmt: skip
    fp8: bool = option(False, "--fp8", action="store_true", help="FP8 linear layers in the transformer blocks: faster, less exact")
    compile: bool | None = option(None, "--no-compile", action="store_false", help="skip torch.compile of the transformer blocks (on by default on a GPU)")
    device: str | None = option(None, "--device", type=device_argument, help="cuda, cuda:N or cpu (default: cuda if present)")
    dtype: str | None = option(None, "--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    decode_dtype: str = option("fp32", "--decode-dtype", choices=["fp32", "bf16"], help=DECODE_DTYPE_HELP)
    encode_dtype: str = option("fp32", "--encode-dtype", choices=["fp32", "bf16"],
                               help="the VAE encode's precision: fp32 as the official code (default), or bf16: about twice as fast")  # fmt: skip
    attention: str | None = option(None, "--attention", help="attention kernel: cudnn, sdpa, or sage (SageAttention 1, INT8, opt-in and not exact; pip install sageattention); default: the fastest exact one for the device")
    keep_text_encoder: bool = option(False, "--keep-text-encoder", action="store_true",
                                     help="keep the text encoder on the GPU between videos (11 GB; by default it waits in host memory and visits the GPU to encode)")  # fmt: skip
    batch_cfg: bool = option(False, "--batch-cfg", action="store_true", help="run the two guidance passes of a step as one batch")
    gpus: int | None = option(None, "--gpus", type=int, group=SEVERAL_GPUS, help="start this many processes, one per GPU (default 1; under torchrun: its world size)")
    ulysses: int | None = option(None, "--ulysses", type=int, metavar="U", group=SEVERAL_GPUS, help="force the plan: sequence parallel degree (divides the heads)")
    cfg_parallel: bool = option(False, "--cfg-parallel", action="store_true", group=SEVERAL_GPUS, help="force the plan: guidance passes on two halves of the GPUs")
    fsdp: bool = option(False, "--fsdp", action="store_true", group=SEVERAL_GPUS, help="force the plan: shard experts and text encoder over all GPUs")
    gpu_memory: float | None = option(None, "--gpu-memory", type=gib_argument, metavar="GiB", group=SEVERAL_GPUS,
                                      help="plan for this much memory per GPU, and use no more (default: the GPU's)")  # fmt: skip
    host_memory: float | None = option(None, "--host-memory", type=gib_argument, metavar="GiB", group=SEVERAL_GPUS,
                                       help="plan for this much host memory on this machine (default: what it has available; the page cache it would take back counts)")  # fmt: skip
    split_encode: bool = option(False, "--split-encode", action="store_true", group=SEVERAL_GPUS,
                                help="split the VAE encode over the GPUs (0.8 s less at 720P on two H200s); the video then differs from one GPU's "
                                     "by rounding (default: off, the same video as one GPU to the bit)")  # fmt: skip
    # The step cache (transforms/step_cache.py): None, or a threshold of 0, is every forward whole.
    step_cache: StepCacheConfig | None = option(
        None, "--step-cache", type=float, action=_StepCacheSetting, const=("threshold",), metavar="THRESHOLD", group=STEP_CACHE,
        help="reuse the middle blocks' output of an earlier step while the first blocks' output changes by less than this "
             "relative amount (e.g. 0.1; default 0: off, every forward exact)",
        more=(Flag(("--step-cache-blocks",), "the first F blocks, which decide, and the last B blocks always run (default 1,0)",
                   {"type": _block_counts, "action": _StepCacheSetting, "const": ("first_blocks", "last_blocks"), "metavar": "F,B"}),
              Flag(("--step-cache-max",), "at most K forwards in a row reuse the cache (default 3)",
                   {"type": int, "action": _StepCacheSetting, "const": ("max_reuses",), "metavar": "K"})),
        read=_step_cache,
    )  # fmt: skip

    def __post_init__(self):
        # Each field in one form whatever the caller wrote: the offload mode as its enum (None: chosen
        # to fit), precisions by name (a torch dtype is taken too), the step cache's threshold alone as its setting.
        if self.offload is not None:
            object.__setattr__(self, "offload", Offload.parse(self.offload))
        if self.step_cache is not None and not isinstance(self.step_cache, StepCacheConfig):
            # A threshold alone; anything else is refused there with the command line's words, not as a traceback later.
            threshold = self.step_cache
            object.__setattr__(self, "step_cache", StepCacheConfig(threshold=float(threshold) if isinstance(threshold, int) and not isinstance(threshold, bool) else threshold))
        for name in ("dtype", "decode_dtype", "encode_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name)))
        if not self.lightning and not self.distilled:
            without = "--no-lightning" if command_line() else "lightning=False"
            raise WanError(f"{without} is for {option_name('distilled')}", f"add {option_name('distilled')}, or leave it out")
        if isinstance(self.model, str):
            object.__setattr__(self, "model", spec_for(self.model).name)


def add_options(parser, options=RunOptions, only: tuple[str, ...] | None = None) -> None:
    """Add the flags of ``options``' fields (``only`` these, if given) to ``parser``, each field's
    flags in its help group."""
    groups = {}
    for spec in fields(options):
        if only is not None and spec.name not in only:
            continue
        title = spec.metadata["group"]
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = parser if title is None else groups[title]
        for flag in spec.metadata["flags"]:
            target.add_argument(*flag.names, dest=spec.name, default=spec.default, help=flag.help, **flag.arguments)


def options_from(args: argparse.Namespace, options=RunOptions, **given):
    """The ``options`` dataclass from the flags ``add_options`` added (what the Namespace lacks keeps its default), and ``given``."""
    values = {}
    for spec in fields(options):
        if spec.name in given or not hasattr(args, spec.name):
            continue
        read = spec.metadata["read"]
        values[spec.name] = read(getattr(args, spec.name)) if read is not None else getattr(args, spec.name)
    return options(**values, **given)
