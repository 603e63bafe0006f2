"""Generation settings: presets, defaults from the model card, input validation, and the flags that
set them (``SAMPLING_FLAGS``)."""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict, dataclass, field, replace

from wan_i2v.errors import WanError, option
from wan_i2v.models.spec import DEFAULT_SPEC, SPECS, ModelSpec, spec_for

# The samplers' names (``sampling/schedulers.py`` has the samplers): here, so that the settings and
# the command's help need no torch.
SOLVERS = ("unipc", "dpm++", "euler")

# The official default negative prompt (wan/configs/shared_config.py), used when none is given.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

# The model whose presets and size rules the settings follow.
SPEC = spec_for(DEFAULT_SPEC)
MIN_SIDE = 32
MAX_STEPS = 1000
# Far beyond what the model was trained for (720P, 81 frames), still short of what no machine holds:
# a 8192*8192 request otherwise ran for a minute until the OS killed it.
MAX_AREA = 2048 * 2048
MAX_FRAMES = 321
MAX_GUIDE_SCALE = 30.0
MAX_FPS = 240


def parse_size(size: str, spec: ModelSpec | str = DEFAULT_SPEC) -> tuple[int, float | None]:
    """A preset of ``spec``'s (``720P``, ``480P``) or ``A*B`` -> (max_area, preset shift or None)."""
    preset = spec_for(spec).presets.get(size.upper())
    if preset is not None:
        return preset.max_area, preset.shift
    parts = size.replace("x", "*").split("*")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise WanError(f"unknown size {size!r}", f"use {', '.join(spec_for(spec).presets)} or W*H such as 1280*720")
    sides = [int(p) for p in parts]
    if any(side % SPEC.size_multiple for side in sides):
        raise WanError(f"size {size} has a side that is not a multiple of {SPEC.size_multiple}", "e.g. 1280*720, 832*480, 1024*576")
    if min(sides) < MIN_SIDE:
        raise WanError(f"size {size} is too small", f"each side must be at least {MIN_SIDE}")
    if sides[0] * sides[1] > MAX_AREA:
        raise WanError(f"size {size} is too large", "at most 2048*2048 pixels (the model is trained for 1280*720)")
    return sides[0] * sides[1], None


def size_shape(size: str, spec: ModelSpec | str = DEFAULT_SPEC) -> tuple[int, int] | None:
    """The (height, width) a size written W*H names, as the official --size (704*1280: portrait); None
    for a preset of ``spec``'s, which names an area alone."""
    if size.upper() in spec_for(spec).presets:
        return None
    parse_size(size, spec)  # (refused in its words)
    width, height = (int(part) for part in size.replace("x", "*").split("*"))
    return height, width


def check_exact_size(height, width, spec: ModelSpec | str = DEFAULT_SPEC) -> None:
    """An exact video size (``--height``/``--width``): both given, each a whole number of ``spec``'s latent patches."""
    if height is None or width is None:
        raise WanError(f"{option('height')} and {option('width')} go together", "give both for an exact size, or neither for the area rule")
    model = spec_for(spec)
    multiple = model.size_multiple
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, int):
            raise WanError(f"{option(name)} must be a whole number, not {side!r}")
        if side % multiple or side < MIN_SIDE:
            below = max(side // multiple * multiple, MIN_SIDE)
            raise WanError(f"{option(name, side)} is not a multiple of {multiple} of at least {MIN_SIDE} ({model.name}'s VAE stride times its patch size)",
                           f"use {below} or {below + multiple}")  # fmt: skip
    if height * width > MAX_AREA:
        raise WanError(f"{option('height')} {height} by {option('width')} {width} is too large", "at most 2048*2048 pixels (the model is trained for 1280*720)")


def check_frame_num(frame_num: int) -> None:
    if frame_num < 5:
        raise WanError(f"{option('frame_num')} {frame_num} is too small", "use at least 5 (a frame count of the form 4n+1)")
    if frame_num > MAX_FRAMES:
        raise WanError(f"{option('frame_num')} {frame_num} is too large", f"use at most {MAX_FRAMES} (the model is trained for 81: 5 s at 16 fps)")
    if (frame_num - 1) % 4:
        below = (frame_num - 1) // 4 * 4 + 1
        raise WanError(f"{option('frame_num')} {frame_num} is not of the form 4n+1", f"use {below} or {below + 4}")


def guide_pair(values) -> tuple[float, float]:
    """One guide scale for both experts (a number, or a sequence of one), or the (low-noise, high-noise) pair."""
    values = (float(values),) if isinstance(values, (int, float)) else tuple(float(value) for value in values)
    if not 1 <= len(values) <= 2:
        raise WanError(f"{option('guide_scale')} takes one or two values, not {len(values)}", "the low-noise and the high-noise expert's, e.g. 3.5 and 3.5")
    return values * (2 // len(values))


# Drawn seeds stay below 2**53: exact in JavaScript's numbers (the server's page, most JSON clients).
DRAWN_SEEDS = 2**53


@dataclass(frozen=True)
class SamplingDefaults:
    """What a video gets for the sampling settings it leaves out: the model card's (``OFFICIAL``), the
    distilled models' recipe (``DISTILLED``), or a server's own (its command line's)."""

    size: str = "720P"
    frame_num: int = 81
    steps: int = 40
    guide_scale: tuple[float, float] = (3.5, 3.5)  # (low-noise expert, high-noise expert)
    shift: float | None = None  # None: the size preset's (5.0 for other sizes)
    solver: str = "unipc"
    model: ModelSpec | str = DEFAULT_SPEC  # whose presets the size names

    @classmethod
    def official(cls, spec: ModelSpec | str = DEFAULT_SPEC) -> "SamplingDefaults":
        """``spec``'s model card's defaults (``OFFICIAL``: the default model's)."""
        card = spec_for(spec).defaults
        return cls(size=spec_for(spec).default_preset, frame_num=card.frame_num, steps=card.steps, guide_scale=card.guide_scale, model=spec)

    @classmethod
    def recipe(cls, distilled: bool, spec: ModelSpec | str = DEFAULT_SPEC) -> "SamplingDefaults":
        """``spec``'s model card's defaults, with ``distilled`` lightx2v's recipe for the 4-step distilled
        models in place of its sampling (the size and frames stay the model's: TI2V-5B's 121 at 24 fps)."""
        official = cls.official(spec)
        return official.given(**DISTILLED_SAMPLING) if distilled else official

    def given(self, **values) -> "SamplingDefaults":
        """These defaults with the ``values`` that are not None in their place (``guide_scale`` as its pair)."""
        values = {name: value for name, value in values.items() if value is not None}
        if "guide_scale" in values:
            values["guide_scale"] = guide_pair(values["guide_scale"])
        return replace(self, **values)


OFFICIAL = SamplingDefaults.official()
DISTILLED_SAMPLING = dict(steps=4, guide_scale=(1.0, 1.0), shift=5.0, solver="euler")
DISTILLED = SamplingDefaults.recipe(True)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that, with the checkpoint and the image, determines the video. Front ends build it
    with ``of`` (defaults, the size's preset, the guide pair and a drawn seed in one place); the
    pipeline takes it whole."""

    prompt: str
    negative_prompt: str
    max_area: int = SPEC.presets[SPEC.default_preset].max_area
    frame_num: int = OFFICIAL.frame_num
    steps: int = OFFICIAL.steps
    shift: float = 5.0
    guide_scale: tuple[float, float] = OFFICIAL.guide_scale  # (low-noise expert, high-noise expert)
    seed: int = 0
    solver: str = OFFICIAL.solver
    # An exact video size asked for (both or neither; None: the image's aspect ratio within max_area, the official rule)
    height: int | None = None
    width: int | None = None
    fps: int = SPEC.fps  # the mp4's frame rate (the output's only: a saved state is resumed whatever it is)
    # The (height, width) of a W*H size: the aspect a video without an image takes (None: the model's
    # text-to-video shape); a video from an image keeps the image's aspect (the official area rule).
    text_to_video_shape: tuple[int, int] | None = None
    # The seed was drawn, not asked for: a saved state's seed is then taken instead (not a setting of the video).
    seed_drawn: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def of(
        cls, prompt: str, negative_prompt: str | None = None, *, defaults: SamplingDefaults = OFFICIAL, size: str | None = None,
        max_area: int | None = None, frame_num: int | None = None, steps: int | None = None, shift: float | None = None,
        guide_scale=None, seed: int | None = None, solver: str | None = None, height: int | None = None, width: int | None = None,
        fps: int | None = None,
    ) -> "GenerationSettings":  # fmt: skip
        """The checked settings of a video from what was given (None: ``defaults``'): ``size`` (a
        preset or W*H) or ``max_area``, or an exact ``height`` and ``width``; ``guide_scale`` one value
        or the (low-noise, high-noise) pair; ``seed`` None or -1 draws one; the negative prompt defaults
        to the official one; ``fps``: the model's unless given."""
        exact = height is not None or width is not None
        if exact and size is not None:
            raise WanError(f"{option('size')} and {option('height')}/{option('width')} both set the video's size", "give one of them")
        chosen = defaults.given(size=size, frame_num=frame_num, steps=steps, shift=shift, guide_scale=guide_scale, solver=solver)
        area, preset_shift = parse_size(chosen.size, chosen.model)
        if exact:
            check_exact_size(height, width, chosen.model)
            area = height * width
        drawn = seed is None or seed == -1
        return cls(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt,
            max_area=area if max_area is None else max_area,
            height=height,
            width=width,
            fps=spec_for(chosen.model).fps if fps is None else fps,
            text_to_video_shape=None if exact else size_shape(chosen.size, chosen.model),
            frame_num=chosen.frame_num,
            steps=chosen.steps,
            shift=chosen.shift if chosen.shift is not None else preset_shift or 5.0,
            guide_scale=chosen.guide_scale,
            seed=random.randrange(DRAWN_SEEDS) if drawn else seed,
            solver=chosen.solver,
            seed_drawn=drawn,
        )

    def __post_init__(self):
        if self.text_to_video_shape is not None:  # (a list, from JSON)
            object.__setattr__(self, "text_to_video_shape", tuple(self.text_to_video_shape))
        for name in ("frame_num", "steps", "max_area", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise WanError(f"{name} must be a whole number, not {value!r}")
        check_frame_num(self.frame_num)
        if self.max_area > MAX_AREA:
            raise WanError(f"max_area {self.max_area} is too large", f"at most {MAX_AREA} pixels (the model is trained for 1280*720)")
        if not 1 <= self.steps <= MAX_STEPS:
            raise WanError(f"steps {self.steps} out of range", f"use 1 to {MAX_STEPS} (the model card uses 40)")
        if len(self.guide_scale) != 2 or not all(0.0 <= g <= MAX_GUIDE_SCALE for g in self.guide_scale):
            raise WanError(f"guide scale {self.guide_scale} out of range", f"{option('guide_scale')} takes values from 0 to {MAX_GUIDE_SCALE} (default 3.5)")
        if not 0.0 < self.shift <= 100.0:
            raise WanError(f"shift {self.shift} out of range", "use a value above 0 (5.0 for 720P, 3.0 for 480P)")
        if self.solver not in SOLVERS:
            raise WanError(f"unknown solver {self.solver!r}", f"choose one of {', '.join(SOLVERS)}")
        if self.max_area < MIN_SIDE * MIN_SIDE:
            raise WanError(f"area {self.max_area} is too small", f"use at least {MIN_SIDE}*{MIN_SIDE}")
        if not 0 <= self.seed < 2**63:
            raise WanError(f"seed {self.seed} out of range", "use an integer from 0 to 2**63-1")
        if self.height is not None or self.width is not None:
            check_exact_size(self.height, self.width)
            if self.max_area != self.height * self.width:
                raise WanError(f"max_area {self.max_area} is not height*width {self.height}*{self.width}", "give an exact size or an area, not both")
        if isinstance(self.fps, bool) or not isinstance(self.fps, int) or not 1 <= self.fps <= MAX_FPS:
            raise WanError(f"{option('fps')} {self.fps!r} out of range", f"give a whole number of frames a second from 1 to {MAX_FPS} (the model's is {SPEC.fps})")

    def video_size(self, image_height: int | None = None, image_width: int | None = None, spec: ModelSpec | str = DEFAULT_SPEC) -> tuple[int, int]:
        """The video's pixel (height, width) for an image of this size: the exact size asked for, else
        ``spec``'s area rule (the image's aspect ratio within ``max_area``). Without an image
        (text-to-video), the aspect of the W*H size asked for, else the model's text-to-video shape."""
        if self.height is not None:
            check_exact_size(self.height, self.width, spec)  # (settings made for another model's patches)
            return self.height, self.width
        model = spec_for(spec)
        if image_height is None:
            image_height, image_width = self.text_to_video_shape or model.defaults.text_to_video_shape
        return model.video_size(image_height, image_width, self.max_area)

    @property
    def guided(self) -> bool:
        """Guidance runs (a scale other than 1: two passes per step)."""
        return any(scale != 1 for scale in self.guide_scale)

    def as_dict(self) -> dict:
        """The settings as the video's metadata and the saved state record them."""
        settings = asdict(self)
        del settings["seed_drawn"]
        if self.text_to_video_shape is None:  # (a video from an image, or of a preset's size: recorded as before the setting)
            del settings["text_to_video_shape"]
        return settings



# -- the flags that set them ----------------------------------------------------------------------


def seed_argument(text: str) -> int | None:
    """--seed: an integer; -1 means random, as in the official script."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    return None if value == -1 else value


def guide_scale_argument(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def per_model(default) -> str:
    """A default that is each model's own, for the help: "the model's: 81 for i2v-a14b, 121 for ti2v-5b"
    (``default`` of a spec's ``CardDefaults``)."""
    return "the model's: " + ", ".join(f"{default(spec.defaults):g} for {spec.aliases[0]}" for spec in SPECS.values())


@dataclass(frozen=True)
class SamplingFlag:
    """A flag of the video's settings. What it sets (``dest``, argparse's name for its first flag) is
    the ``GenerationSettings.of`` keyword of that name, but for ``--distilled``, which picks the
    recipe the others default to."""

    names: tuple[str, ...]  # ours, then the official script's spelling
    help: str  # for one video (generate, demo); {frame_num}, {steps}, {prompt!r}, {seed}: the command's defaults
    job_help: str | None = None  # for a server's jobs, as their default (None: each job gives its own)
    given_help: str | None = None  # for a command that gives the setting a default of its own (the demo's prompt and seed)
    required: bool = False  # unless the command gives it a default
    default: object = None
    arguments: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.names[0].removeprefix("--").replace("-", "_")


# In the order of the server's job defaults (as before they were declared once), the video's own (prompt, seed) around them.
SAMPLING_FLAGS = (
    SamplingFlag(("--prompt",), "what happens in the video", given_help="default: {prompt!r}", required=True),
    SamplingFlag(("--negative-prompt",), "default: the official negative prompt"),
    SamplingFlag(("--size",), "720P (1280*720, shift 5; the default), 480P (832*480, shift 3) or W*H; the image's aspect ratio is kept "
                 "(without an image, the size's: 704*1280 is portrait)",
                 job_help="720P, 480P or W*H (default 720P; the GPUs' plan is made for it)"),
    # An exact size and the mp4's rate: a video's own (a server's jobs give them in their requests).
    SamplingFlag(("--height",), f"with --width: exactly this size (each a multiple of "
                 f"{' or '.join(f'{spec.size_multiple} for {spec.name}' for spec in SPECS.values())}), where --size's area rule would "
                 "round to the image's aspect ratio; the image is resized and center-cropped to it; not with --size", arguments={"type": int}),
    SamplingFlag(("--width",), "with --height: the video's exact width", arguments={"type": int}),
    SamplingFlag(("--fps",), f"the mp4's frame rate (default {SPEC.fps}, the model's); the frames made are the same", arguments={"type": int}),
    SamplingFlag(("--frame-num", "--frame_num"), "a number of the form 4n+1 (default {frame_num})",
                 job_help="4n+1 (default {frame_num}; the GPUs' plan is made for it)", default=OFFICIAL.frame_num, arguments={"type": int}),
    SamplingFlag(("--steps", "--sample_steps"), f"1 to {MAX_STEPS} (default {{steps}}; {DISTILLED.steps} with --distilled)",
                 job_help=f"default {{steps}}; {DISTILLED.steps} with --distilled", arguments={"type": int}),
    SamplingFlag(("--guide-scale", "--sample_guide_scale"),
                 f"one value for both experts, or the low-noise and high-noise expert's (default {per_model(lambda card: card.guide_scale[0])}; 1 with --distilled: "
                 "no guidance, one forward per step)",
                 job_help=f"default {per_model(lambda card: card.guide_scale[0])}; 1 with --distilled", arguments={"type": guide_scale_argument, "nargs": "+", "metavar": ("LOW", "HIGH")}),
    SamplingFlag(("--shift", "--sample_shift"), "default: the preset's (5.0 for custom sizes and with --distilled)",
                 job_help="default: the size preset's (5.0 with --distilled)", arguments={"type": float}),
    SamplingFlag(("--seed", "--base_seed"), "default (or -1): random, printed and stored in the mp4",
                 given_help="default {seed}: the same video each time (-1: random)", arguments={"type": seed_argument}),
    SamplingFlag(("--solver", "--sample_solver"), "unipc (default, the official), dpm++, or euler (the distilled models' 4-step schedule; default with --distilled)",
                 job_help="default unipc; euler with --distilled", arguments={"choices": SOLVERS}),
    SamplingFlag(("--distilled",), "sample as the 4-step distilled models (Lightning LoRAs, distilled checkpoints) are: "
                 "--solver euler --steps 4 --guide-scale 1 --shift 5, each overridable",
                 job_help="jobs sample as the 4-step distilled models: euler, 4 steps, guide scale 1, shift 5", default=False, arguments={"action": "store_true"}),
)  # fmt: skip


def add_sampling_flags(parser, *, frame_num: int | None = OFFICIAL.frame_num, steps: int | None = OFFICIAL.steps, prompt: str | None = None,
                       seed: int | None = None, leave_out: tuple[str, ...] = (), jobs: bool = False) -> None:  # fmt: skip
    """Add the flags of the video's settings to ``parser``: a command's defaults of ``frame_num``,
    ``steps`` (then in ``args.default_steps``; None for both: the model's), ``prompt`` (None: required) and ``seed`` (None:
    drawn), without the settings in ``leave_out``. With ``jobs``: the flags of a server's defaults
    for each job, in their wording."""
    own = {"frame_num": frame_num, "prompt": prompt, "seed": seed}
    for flag in SAMPLING_FLAGS:
        text = flag.job_help if jobs else flag.help
        if flag.dest in leave_out or text is None:
            continue
        default = own.get(flag.dest, flag.default)
        if flag.given_help is not None and default is not None:
            text = flag.given_help
        parser.add_argument(*flag.names, default=default, required=flag.required and default is None,
                            help=text.format(frame_num=frame_num if frame_num is not None else per_model(lambda card: card.frame_num),
                                             steps=steps if steps is not None else per_model(lambda card: card.steps), prompt=prompt, seed=seed),
                            **flag.arguments)  # fmt: skip
    if not jobs:
        parser.set_defaults(default_steps=steps)


def sampling_given(args: argparse.Namespace) -> dict:
    """What the sampling flags ``add_sampling_flags`` added gave, as ``GenerationSettings.of``'s keywords."""
    return {flag.dest: getattr(args, flag.dest) for flag in SAMPLING_FLAGS if flag.dest != "distilled" and hasattr(args, flag.dest)}
