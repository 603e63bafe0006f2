"""LoRA adapters, merged into an expert's weights as they load.

Each adapted parameter is read from the checkpoint, the adapters' deltas are added in fp32 on the
run device (``W += strength * alpha / rank * up @ down``; a ``diff`` adds ``strength * diff``), and
the loader rounds the sum once to the run dtype. The merge happens in the tensor source, before
every transform of the execution plan, so FP8, FSDP (a rank merges only its rows), offload and
compile see ordinary weights.

Formats, told apart by their keys (``.safetensors`` only):
- lightx2v / Lightning: ``diffusion_model.<official path>.lora_down.weight`` [rank, in],
  ``.lora_up.weight`` [out, rank], ``.alpha``; ``.diff`` (the weight), ``.diff_b`` (the bias),
  ``.diff_m`` (``blocks.N.diff_m``: the block's modulation);
- PEFT / ComfyUI repacks: ``.lora_A.weight`` (down), ``.lora_B.weight`` (up), optional ``.alpha``,
  with the prefix ``diffusion_model.``, ``model.diffusion_model.`` or none;
- PEFT ``save_pretrained``: the same suffixes with the prefix ``base_model.model.``;
- Kohya / musubi-tuner (most ComfyUI Wan LoRAs): ``lora_unet_<official path, dots as underscores>``
  with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
- diffusers: the same suffixes on diffusers' names with the prefix ``transformer.``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from wan_i2v.cache.hub_files import HubFile, is_hub_file
from wan_i2v.cache.manifest import hash_stream
from wan_i2v.errors import WanError
from wan_i2v.loading.checkpoint import TensorSource, refill
from wan_i2v.loading.names import diffusers_to_official
from wan_i2v.models.spec import DEFAULT_SPEC, ModelSpec, spec_for

# (suffix, role, the parameter it changes relative to the module path)
SUFFIXES = (
    (".lora_down.weight", "down", ".weight"),
    (".lora_up.weight", "up", ".weight"),
    (".lora_A.weight", "down", ".weight"),
    (".lora_B.weight", "up", ".weight"),
    (".alpha", "alpha", ".weight"),
    (".diff_b", "diff", ".bias"),
    (".diff_m", "diff", ".modulation"),
    (".diff", "diff", ".weight"),
)
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
# Kohya's and musubi-tuner's keys: the module path with its dots written as underscores
# (lora_unet_blocks_0_self_attn_q), read back through the model's own names.
KOHYA_PREFIX = "lora_unet_"
# Layers of Wan2.1-I2V's CLIP image branch, which Wan2.2-I2V does not have; some lightx2v files carry them.
IMAGE_EMBEDDING = re.compile(r"(^|\.)(img_emb|k_img|v_img|norm_k_img)(\.|$)")
NOT_FOR_THIS_MODEL = "the LoRA is for another model (it must be for Wan2.2-I2V-A14B's 14B transformer)"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its strength, as the user gives it."""

    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``PATH`` or ``PATH:STRENGTH``; the path may be a hub file, ``hf://OWNER/REPO[@REVISION]/PATH``."""
        path, sep, strength = text.rpartition(":")
        spec = cls(text)
        if sep and path:
            try:
                spec = cls(path, float(strength))
            except ValueError:
                # After a .safetensors name the colon was meant for a strength; elsewhere it is the path's.
                if path.endswith(".safetensors") and not text.endswith(".safetensors"):
                    raise WanError(f"the LoRA strength {strength!r} in {text} is not a number", f"give a number such as {path}:0.8") from None
        if is_hub_file(spec.path):
            HubFile.parse(spec.path)  # a form that names no file is refused here, before any download
        return spec


@dataclass(frozen=True)
class Loras:
    """The LoRAs of each expert, by the expert's name in the model's spec, applied in order."""

    by_expert: tuple[tuple[str, tuple[LoraSpec, ...]], ...] = ()  # (name, its LoRAs), sorted by name, none empty

    @classmethod
    def of(cls, loras, spec: ModelSpec | str = DEFAULT_SPEC) -> "Loras":
        """From ``{expert name: [(path, strength) or path, ...]}`` (or a Loras, or None); the names are ``spec``'s experts'."""
        if isinstance(loras, Loras):
            return loras
        loras = loras or {}
        names = [expert.name for expert in spec_for(spec).experts]
        unknown = set(loras) - set(names)
        if unknown:
            quoted = [f'"{name}"' for name in names]
            raise WanError(f"LoRAs for an unknown expert {sorted(unknown)[0]!r}", f"the experts are {' and '.join(quoted)}")

        def specs(items) -> tuple[LoraSpec, ...]:
            return tuple(item if isinstance(item, LoraSpec) else LoraSpec(str(item)) if isinstance(item, (str, Path)) else LoraSpec(str(item[0]), float(item[1])) for item in items)  # fmt: skip

        return cls(tuple(sorted((name, specs(items)) for name, items in loras.items() if items)))

    def for_expert(self, name: str) -> tuple[LoraSpec, ...]:
        return dict(self.by_expert).get(name, ())

    def from_cache(self, root: Path, fetch: bool = True) -> "Loras":
        """These LoRAs with each hub file (hf://...) as its copy in the cache ``root``: fetched there
        first (resumed, verified) where it is not, unless not ``fetch`` (it then stays a hub file)."""

        def local(spec: LoraSpec) -> LoraSpec:
            if not is_hub_file(spec.path):
                return spec
            hub_file = HubFile.parse(spec.path)
            path = hub_file.fetched(root) if fetch else hub_file.cached(root)
            return spec if path is None else replace(spec, path=str(path))

        return Loras(tuple((name, tuple(local(spec) for spec in specs)) for name, specs in self.by_expert))

    def hub_files(self) -> list[str]:
        """The hub files (hf://...) among these LoRAs' paths, each once."""
        return sorted({spec.path for _, specs in self.by_expert for spec in specs if is_hub_file(spec.path)})


@dataclass
class Delta:
    """One LoRA's change to one parameter."""

    strength: float
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None

    def shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape) if self.diff is not None else (self.up.shape[0], self.down.shape[1])

    def tensor(self, rows: slice | None, device: torch.device) -> torch.Tensor:
        """The delta (fp32, on ``device``), or its ``rows`` (over dim 0, as a shard reads them)."""
        if self.diff is not None:
            diff = self.diff if rows is None else self.diff[rows]
            return self.strength * diff.to(device).float()
        up = self.up if rows is None else self.up[rows]
        scale = self.strength * (1.0 if self.alpha is None else self.alpha / self.down.shape[0])
        return scale * (up.to(device).float() @ self.down.to(device).float())


@dataclass
class LoraFile:
    """A LoRA file read and checked against a checkpoint: its deltas by official parameter name."""

    spec: LoraSpec
    sha256: str
    deltas: dict[str, Delta] = field(default_factory=dict)

    def record(self, expert: str) -> dict:
        """What a run's metadata and resume state keep of it."""
        return {"expert": expert, "file": Path(self.spec.path).name, "sha256": self.sha256, "strength": self.spec.strength}


def read_lora(spec: LoraSpec, base: TensorSource) -> LoraFile:
    """Read ``spec``'s file and match each key to a parameter of the checkpoint ``base``; a key
    that matches none, or a delta whose shape does not fit, is a one-line error."""
    from safetensors import safe_open

    path = Path(spec.path)
    if path.suffix != ".safetensors":
        raise WanError(f"LoRA file {path} is not a .safetensors file", "only .safetensors LoRAs are read")
    if not path.is_file():
        raise WanError(f"LoRA file not found: {path}", "give the path of a .safetensors LoRA")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise WanError(f"cannot read LoRA file {path}: {exc}", "it may be incomplete or not a safetensors file") from None
    names = set(base.keys())
    from_diffusers = diffusers_to_official(names)
    from_kohya = {KOHYA_PREFIX + module.replace(".", "_"): module for module in (name.rpartition(".")[0] for name in names)}
    parts: dict[str, dict] = {}
    skipped = 0
    for key, value in tensors.items():
        suffix = next(((s, role, target) for s, role, target in SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise WanError(f"{path}: key {key!r} is not a LoRA key", "a LoRA file has lora_down/lora_up, lora_A/lora_B, alpha or diff keys")
        ending, role, target = suffix
        module = key[: -len(ending)]
        if IMAGE_EMBEDDING.search(module):
            skipped += 1
            continue
        name = _parameter_name(module, target, names, from_diffusers, from_kohya)
        if name is None:
            raise WanError(f"{path}: key {key!r} matches no parameter of the model", NOT_FOR_THIS_MODEL)
        parts.setdefault(name, {})[role] = value
    if skipped:
        warnings.warn(f"{path.name}: skipped {skipped} keys of image-embedding layers that Wan2.2-I2V does not have")
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        hash_stream(digest, file)
    lora = LoraFile(spec, digest.hexdigest())
    for name, found in parts.items():
        if "diff" in found:
            delta = Delta(spec.strength, diff=found["diff"])
        elif "down" in found and "up" in found:
            alpha = found.get("alpha")
            delta = Delta(spec.strength, down=found["down"], up=found["up"], alpha=None if alpha is None else float(alpha))
            if delta.down.ndim != 2 or delta.up.ndim != 2 or delta.down.shape[0] != delta.up.shape[1]:
                raise WanError(f"{path}: the LoRA pair of {name!r} has shapes {tuple(delta.up.shape)} x {tuple(delta.down.shape)}", "the file is damaged")
        else:
            raise WanError(f"{path}: {name!r} has {', '.join(sorted(found))} but no lora_down/lora_up pair", "the file is damaged")
        if delta.shape() != base.shape(name):
            raise WanError(f"{path}: the delta of {name!r} has shape {delta.shape()}, the parameter {base.shape(name)}", NOT_FOR_THIS_MODEL)
        lora.deltas[name] = delta
    if not lora.deltas and not skipped:
        raise WanError(f"{path} holds no LoRA weights", "give a LoRA .safetensors file")
    return lora


def _parameter_name(module: str, target: str, names: set[str], from_diffusers: dict[str, str], from_kohya: dict[str, str]) -> str | None:
    """The official parameter a key's module path (with its prefix) changes, or None."""
    if module.startswith(KOHYA_PREFIX):
        official = from_kohya.get(module)
        return None if official is None else official + target
    for prefix in PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
            if prefix == "transformer.":
                return from_diffusers.get(module + target)
            break
    name = module + target
    if name in names:
        return name
    return from_diffusers.get(name)  # diffusers' names without the prefix (some repacks)


def adapted(base: TensorSource, loras: Iterable[LoraFile], device: torch.device | str) -> TensorSource:
    """``base`` whose parameters the ``loras`` change read as base + deltas, in fp32, merged on
    ``device`` (a GPU merges an expert in seconds; the loader then rounds once to its dtype).
    Streamed weights are merged the same way each time they come up."""
    by_name: dict[str, list[Delta]] = {}
    for lora in loras:
        for name, delta in lora.deltas.items():
            by_name.setdefault(name, []).append(delta)
    device = torch.device(device)

    def merged(value: torch.Tensor, rows: slice | None, deltas: list[Delta]) -> torch.Tensor:
        # Copied in the checkpoint's dtype and widened on the device: a CPU-side widening of a
        # whole expert took 19 s on the H200 host, the merge itself a fraction of a second.
        value = value.float()
        for delta in deltas:
            value = value + delta.tensor(rows, value.device)  # out of place: the read tensor may be the source's own
        return value

    return base.with_merges({name: (lambda value, rows, deltas=deltas: merged(value, rows, deltas)) for name, deltas in by_name.items()}, device)


@dataclass(frozen=True)
class MergedLoras:
    """The LoRA files merged into each expert's weights, by expert name, in the order applied."""

    files: dict[str, list[LoraFile]] = field(default_factory=dict)

    def records(self) -> list[dict]:
        """What a run's metadata and resume state keep: each file's expert, name, sha256 and strength."""
        return [lora.record(name) for name, files in self.files.items() for lora in files]

    def changed(self, expert: str) -> set[str]:
        """The parameters of ``expert`` that its LoRAs change."""
        return {key for lora in self.files.get(expert, ()) for key in lora.deltas}


def switch_loras(experts, bases: dict[str, TensorSource], current: MergedLoras, loras: Loras, device: torch.device) -> MergedLoras:
    """Replace the ``current`` LoRAs of ``experts`` (a pipeline's ``Experts``) by ``loras`` without
    reloading; returns what is merged now. Every file is read and checked against its expert's
    checkpoint weights (``bases``, by expert name) before any weight changes; then each parameter the
    old or the new LoRAs change is read again and the new deltas merged, in place, wherever it lives
    (GPU, host memory, this rank's shard). Streamed blocks are read with the new merges from then on."""
    experts.release()  # every weight back where it waits: no device copy may go stale
    new = MergedLoras({name: [read_lora(spec, base) for spec in loras.for_expert(name)] for name, base in bases.items()})
    streams = getattr(experts, "streams", {})
    for name, base in bases.items():
        touched = current.changed(name) | new.changed(name)
        source = adapted(base, new.files[name], device)
        if name in streams:  # (its blocks are read through the stream's source; the rest is refilled)
            streams[name].use_source(source)
            touched = {key for key in touched if not key.startswith("blocks.")}
        refill(experts.models[name], source, sorted(touched))
    return new
