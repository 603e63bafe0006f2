"""Reading an official checkpoint, strictly. Its layout is its model's spec's (``models/spec.py``:
``needed_files``): a folder per expert with config.json and diffusers' safetensors (one file, or
shards and their index), the VAE's and the text encoder's ``.pth`` (each with an optional config
for tiny test models), and the tokenizer's folder.

Models are built on the meta device and every tensor goes from the memory-mapped
file straight to its target device and dtype, one at a time, so loading never holds
a full fp32 copy of a 14B model in RAM.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from wan_i2v.errors import WanError, first_line
from wan_i2v.models.spec import DEFAULT_SPEC, SAFETENSORS_FILE, SAFETENSORS_INDEX, ModelSpec, spec_for
from wan_i2v.loading.staging import FileRange, Fill, StagingRing, upload


# For errors about the checkpoint as a whole, where no file tells whose folder it is.
STATUS_HINT = "`wan-i2v cache status` checks the cache's checkpoint, `wan-i2v cache status --ckpt-dir DIR` a folder of your own"


def checkpoint_hint(path: str | Path) -> str:
    """The hint of an error about one file: only the cache's own checkpoint is mended by `wan-i2v cache quick`;
    a folder the user gave is theirs, and offline a download is no answer either."""
    # Imported on failure only: loading needs nothing else of the cache.
    from wan_i2v.cache.layout import loading_hint

    return loading_hint(spec_for(DEFAULT_SPEC).checkpoint_dir_of(Path(path)))


def check_checkpoint_dir(root: Path, spec: ModelSpec | str = DEFAULT_SPEC) -> Path:
    """``root`` if it is a directory holding every file the loader opens (the spec's ``needed_files``);
    else the one-line error, before any planning or loading."""
    if not Path(root).is_dir():
        raise WanError(f"checkpoint directory not found: {root}", "check the path; `wan-i2v cache path` prints the cache's checkpoint")
    missing = next((path for path in spec_for(spec).needed_files(Path(root)) if not (Path(root) / path).is_file()), None)
    if missing is not None:
        raise missing_file_error(Path(root) / missing, "checkpoint file")
    return Path(root)


def missing_file_error(path: Path, what: str) -> WanError:
    return WanError(f"{what} not found: {path}", checkpoint_hint(path))


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (every file of the checkpoint that is JSON holds one)."""
    if not path.is_file():
        raise missing_file_error(path, what)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WanError(f"{what} is not valid JSON: {path} ({first_line(exc)})", checkpoint_hint(path)) from None
    if not isinstance(data, dict):
        raise WanError(f"{what} {path} is not a JSON object", "write it as {\"key\": value, ...}")
    return data


def read_config(config_class, path: Path, what: str):
    """A config dataclass from a JSON object of its fields; an unknown key is an error."""
    values = read_json(Path(path), what)
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise WanError(f"{path}: unknown {what} key {unknown[0]!r}", f"known keys: {', '.join(sorted(known))}")
    return config_class(**values)


@dataclasses.dataclass(frozen=True)
class Stored:
    """A tensor as the checkpoint stores it: its dtype and shape, and where its bytes are (a range of
    a file, or a host tensor such as a memory-mapped ``torch.save`` file's)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: FileRange | None = None
    tensor: torch.Tensor | None = None


class TensorSource:
    """Named tensors of one checkpoint, read lazily; ``files`` names where each key lives.

    Each reader takes a range of rows (``slice`` over dim 0, or None for the whole tensor), so a
    rank that holds a shard reads only its rows from the memory-mapped file. ``stored(key)`` says
    where the bytes are, for the staged copies that read them straight into pinned memory;
    ``merges[key]`` is what an adapter adds to the stored value on the device (a LoRA's deltas).
    A ``converted`` source (``loading.converted``) holds each tensor as the module holds it on the
    device, merged, rounded and in its owner's form already: its bytes land as they are.
    """

    def __init__(
        self,
        readers: Mapping[str, Callable[[slice | None], torch.Tensor]],
        files: Mapping[str, str],
        shapes: Mapping[str, Callable[[], tuple]],
        stored: Mapping[str, Stored] | None = None,
        merges: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        converted: bool = False,
    ):
        self._readers = readers
        self._shapes = shapes
        self._stored = stored or {}
        self.merges = dict(merges or {})
        self.files = files
        self.converted = converted

    def keys(self):
        return self._readers.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._shapes[key]())

    def read(self, key: str, rows: slice | None = None) -> torch.Tensor:
        try:
            return self._readers[key](rows)
        except Exception as exc:  # a truncated or corrupt file surfaces here
            raise WanError(f"cannot read tensor {key!r} from {self.files[key]}: {first_line(exc)}", checkpoint_hint(self.files[key])) from None

    def stored(self, key: str) -> Stored:
        """Where ``key``'s bytes are; a source that cannot say (a test's) gives its value as a host tensor."""
        if key in self._stored:
            return self._stored[key]
        value = self.read(key)
        return Stored(value.dtype, tuple(value.shape), tensor=value)

    def with_merges(self, merges: Mapping[str, Callable[[torch.Tensor, slice | None], torch.Tensor]], device: torch.device | str) -> "TensorSource":
        """The same tensors, those named in ``merges`` read as ``merge(stored value on device, rows)``
        (an adapter: a LoRA's deltas added in fp32). Staged copies apply the same merge to the bytes
        they bring, so a weight read either way is the same."""
        device = torch.device(device)
        readers = {key: (lambda rows, key=key, merge=merge: merge(self.read(key, rows).to(device), rows)) for key, merge in merges.items()}
        added = {key: (lambda value, merge=merge: merge(value, None)) for key, merge in merges.items()}
        return TensorSource({**self._readers, **readers}, self.files, self._shapes, self._stored, {**self.merges, **added})

    def renamed(self, mapping: Callable[[str], str]) -> "TensorSource":
        """The same tensors under other names (a state-dict adapter)."""
        readers, files, shapes, stored, merges = {}, {}, {}, {}, {}
        for key, reader in self._readers.items():
            new = mapping(key)
            readers[new], files[new], shapes[new] = reader, self.files[key], self._shapes[key]
            if key in self._stored:
                stored[new] = self._stored[key]
            if key in self.merges:
                merges[new] = self.merges[key]
        return TensorSource(readers, files, shapes, stored, merges)


def safetensors_source(model_dir: Path, converted: bool = False) -> TensorSource:
    """All tensors of a diffusers-style model folder: one file, or shards with an index (``converted``:
    a converted copy's folder, see ``TensorSource``)."""
    from safetensors import safe_open

    single = model_dir / SAFETENSORS_FILE
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WanError(f"safetensors index has no weight_map: {index}", checkpoint_hint(index))
        shard_names = sorted(set(weight_map.values()))
    elif single.is_file():
        shard_names = [single.name]
    else:
        raise missing_file_error(model_dir / SAFETENSORS_FILE, "model weights")

    readers: dict[str, Callable[[slice | None], torch.Tensor]] = {}
    files: dict[str, str] = {}
    shapes: dict[str, Callable[[], tuple]] = {}
    stored: dict[str, Stored] = {}
    for name in shard_names:
        path = model_dir / name
        if not path.is_file():
            raise missing_file_error(path, "weight shard")
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
            ranges = safetensors_ranges(path)
        except Exception as exc:
            raise WanError(f"cannot open {path}: {first_line(exc)}", checkpoint_hint(path)) from None
        for key in keys:
            readers[key] = lambda rows, handle=handle, key=key: handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows]
            shapes[key] = lambda handle=handle, key=key: handle.get_slice(key).get_shape()
            files[key] = str(path)
            if key in ranges:
                stored[key] = ranges[key]
    if index.is_file():
        absent = sorted(k for k in weight_map if k not in readers)
        if absent:
            raise WanError(f"{index} lists {absent[0]!r} but its shard does not hold it", checkpoint_hint(index))
    return TensorSource(readers, files, shapes, stored, converted=converted)


# safetensors' dtype names (the ones a checkpoint of ours can hold)
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def safetensors_ranges(path: Path) -> dict[str, Stored]:
    """Each tensor of a safetensors file, with the range of the file its bytes occupy (the format: an
    8-byte little-endian header size, a JSON header of dtype, shape and data offsets, then the data)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    ranges = {}
    for key, entry in header.items():
        if key == "__metadata__" or entry.get("dtype") not in SAFETENSORS_DTYPES:
            continue
        begin, end = entry["data_offsets"]
        ranges[key] = Stored(SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), FileRange(str(path), 8 + size + begin, end - begin))
    return ranges


def torch_file_source(path: Path, what: str) -> TensorSource:
    """A state dict saved with ``torch.save`` (loaded with ``weights_only``, memory-mapped)."""
    if not path.is_file():
        raise missing_file_error(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise WanError(f"cannot read {what} {path}: {first_line(exc)}", checkpoint_hint(path)) from None
    if not isinstance(state, Mapping):
        raise WanError(f"{path} does not hold a state dict", checkpoint_hint(path))
    return TensorSource(
        {k: (lambda rows, v=v: v if rows is None else v[rows]) for k, v in state.items()},
        {k: str(path) for k in state},
        {k: (lambda v=v: v.shape) for k, v in state.items()},
        {k: Stored(v.dtype, tuple(v.shape), tensor=v) for k, v in state.items()},
    )


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    for module_name, sub in module.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in sub.named_parameters(recurse=False):
            yield prefix + name, sub, name, param, True
        for name, buf in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                yield prefix + name, sub, name, buf, False


def _local_rows(tensor: DTensor, local: torch.Tensor, name: str) -> slice:
    """The rows of ``tensor`` (sharded over dim 0 as ``torch.chunk`` splits it) that this rank holds as ``local``."""
    placements = tuple(tensor.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"{name}: cannot load a tensor placed as {placements}, only sharded over dim 0")
    rows, ranks = tensor.shape[0], tensor.device_mesh.size()
    per_rank = -(-rows // ranks)
    start = min(rows, tensor.device_mesh.get_local_rank() * per_rank)
    stop = min(rows, start + per_rank)
    if local.shape[0] != stop - start:
        raise ValueError(f"{name}: local shard of {local.shape[0]} rows, expected rows {start}:{stop} of {rows}")
    return slice(start, stop)


def cast_parameters(module: nn.Module, dtype: torch.dtype, keep_fp32: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Give ``module``'s floating tensors (on the meta device, before loading) the dtypes that
    ``load_strict`` will load them in, for transforms that group parameters by dtype (FSDP) and for
    the staged fills, which allocate what each tensor's placeholder says."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and tensor.is_meta:
            tensor.data = tensor.data.to(torch.float32 if keep_fp32(name) else dtype)
    return module


def refill(module: nn.Module, source: TensorSource, names: Iterable[str]) -> None:
    """Write the tensors ``names`` of an already loaded ``module`` again from ``source``, in place,
    wherever each lives now (GPU, host memory, a shard's rows), in its dtype. A module that keeps its
    weight in another form (FP8 and its scales) takes the new weight through its ``load_weight_``."""
    targets = {full: (owner, local_name, tensor) for full, owner, local_name, tensor, _ in _named_tensors(module)}
    with torch.no_grad():
        for name in names:
            owner, local_name, target = targets[name]
            if local_name == "weight" and hasattr(owner, "load_weight_"):
                owner.load_weight_(source.read(name))
            elif isinstance(target, DTensor):
                local = target.to_local()
                local.copy_(source.read(name, _local_rows(target, local, name)).to(local.dtype))
            else:
                target.copy_(source.read(name).to(target.dtype))


def check_strict(module: nn.Module, source: TensorSource) -> None:
    """Every tensor in the source must land in a parameter (or persistent buffer) of ``module`` and
    every one of those must have a tensor of its shape; otherwise a WanError names the file and key."""
    targets = {full: tensor for full, _, _, tensor, _ in _named_tensors(module)}
    missing = sorted(set(targets) - set(source.keys()))
    if missing:
        some_file = next(iter(source.files.values()), None)
        raise WanError(
            f"{some_file or 'the checkpoint'}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
            "the file is of another model or incomplete; " + (checkpoint_hint(some_file) if some_file else STATUS_HINT),
        )
    extra = sorted(set(source.keys()) - set(targets))
    if extra:
        raise WanError(
            f"{source.files[extra[0]]}: unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""),
            "the file is of another model or its config.json does not match it",
        )
    for full, target in targets.items():
        shape = source.shape(full)
        if shape != tuple(target.shape):
            raise WanError(
                f"{source.files[full]}: tensor {full!r} has shape {shape}, the model expects {tuple(target.shape)}",
                "the file is of another model or its config.json does not match it",
            )


def fills(module: nn.Module, source: TensorSource, *, dtype: torch.dtype, keep_fp32: Callable[[str], bool] = lambda name: False,
          prefix: str = "", names: Iterable[str] | None = None) -> list[Fill]:  # fmt: skip
    """How each checkpoint tensor of ``module`` (named ``prefix`` + its name; only ``names`` if given)
    reaches it through staged copies: the stored bytes, then on the device the adapter's merge, the
    run dtype (fp32 where ``keep_fp32``), and the owner's ``stored_weight`` (an FP8 layer's form).
    The module's tensors must already have the dtypes they load in (``cast_parameters``)."""
    wanted = None if names is None else set(names)
    result = []
    for name, owner, local_name, tensor, _ in _named_tensors(module):
        full = prefix + name
        if (wanted is not None and full not in wanted) or full not in source.keys():
            continue
        stored = source.stored(full)
        if source.converted:
            result.append(Fill(full, stored.dtype, stored.shape, [(owner, local_name)], file=stored.file, tensor=stored.tensor))
            continue
        merge = source.merges.get(full)
        final = (torch.float32 if keep_fp32(full) else dtype) if stored.dtype.is_floating_point else stored.dtype
        stores = local_name == "weight" and hasattr(owner, "stored_weight")
        targets = [(owner, key) for key in owner.stored_weight_names()] if stores else [(owner, local_name)]
        if merge is None and not stores and final == stored.dtype:
            convert = None
        else:
            convert = _converter(merge, final, owner if stores else None, local_name)
        result.append(Fill(full, stored.dtype, stored.shape, targets, file=stored.file, tensor=stored.tensor, convert=convert))
    return result


def _converter(merge, dtype: torch.dtype, storing: nn.Module | None, name: str):
    """The device-side steps the loader applies to a stored value: the merge, the rounding to the
    run dtype, and the owner's own form of its weight (the same operations in the same order)."""

    def convert(value: torch.Tensor) -> dict:
        if merge is not None:
            value = merge(value)
        value = value.to(dtype)
        return storing.stored_weight(value) if storing is not None else {name: value}

    return convert


def load_strict(
    module: nn.Module,
    source: TensorSource,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    keep_fp32: Callable[[str], bool] = lambda name: False,
    ring: StagingRing | None = None,
) -> nn.Module:
    """Fill every parameter of ``module`` (usually built on the meta device) from ``source``.

    Every tensor in the source must land in a parameter and every parameter must be
    filled with a tensor of its shape; otherwise a WanError names the file and key.
    Floating tensors go to ``dtype`` except those ``keep_fp32`` selects, the fp32
    islands the official model keeps. A parameter that is already a shard over several ranks
    (FSDP applied on the meta device, then ``to_empty``) gets this rank's rows only, in place.
    With ``ring`` (a staging ring on ``device``) the tensors are read by its threads straight into
    pinned memory and copied up while the next are read: the same values, in seconds.
    """
    check_strict(module, source)
    targets = {full: (owner, name, tensor, is_param) for full, owner, name, tensor, is_param in _named_tensors(module)}
    sharded = {full for full, (_, _, target, _) in targets.items() if isinstance(target, DTensor)}
    for full in sharded:  # a shard (FSDP): this rank's rows, read into its storage
        owner, name, target, is_param = targets[full]
        with torch.no_grad():
            local = target.to_local()
            local.copy_(source.read(full, _local_rows(target, local, full)).to(local.dtype))
    if ring is not None:
        cast_parameters(module, dtype, keep_fp32)  # each staged fill's placeholder has the dtype it loads in
        with torch.no_grad():
            upload(ring, [fill for fill in fills(module, source, dtype=dtype, keep_fp32=keep_fp32) if fill.key not in sharded])
        return module.eval().requires_grad_(False)
    for full, (owner, name, target, is_param) in targets.items():
        if full in sharded:
            continue
        value = source.read(full)
        if value.is_floating_point():
            value = value.to(device=device, dtype=torch.float32 if keep_fp32(full) else dtype)
        else:
            value = value.to(device=device)
        if is_param:
            owner._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            owner._buffers[name] = value
    return module.eval().requires_grad_(False)
