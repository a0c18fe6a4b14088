"""Load and save DiT checkpoints in Wan 2.1's state-dict layout.

Accepted inputs:

- one ``.safetensors`` file, a directory holding one, or a sharded set described by a
  ``*.safetensors.index.json`` (Wan's own 14B layout: ``diffusion_pytorch_model-0000i-of-0000n.safetensors``);
- a ``.pt`` / ``.pth`` file (``torch.load(weights_only=True, mmap=True)``), either a flat state dict or a
  causal-student wrapper ``{'generator': sd, 'generator_ema': sd, ...}`` (CausVid, Self-Forcing).

Keys may carry the ``model.`` prefix that causal students' wrapper modules add; it is stripped. The weights
are never held twice: the model is built on the meta device, every tensor is read from the memory-mapped
file one at a time, cast, and assigned into the module (``load_state_dict(assign=True)``).

Audio layers (TalkingMachines' or InfiniteTalk / LiveAct's, `is_audio_key`) are absent from public Wan
checkpoints. Missing audio tensors are filled with zeros, which makes the model compute exactly plain Wan,
and are listed in the report. Every other missing, unexpected or mis-shaped key is an error that names the
key, both shapes and the preset the checkpoint looks like (by shapes, blocks, image branch, audio variant and
ConvKV memory). A SoulX-LiveAct checkpoint (diffusers layout: sharded safetensors + index, upstream's key
names) loads into the `soulx-liveact` preset as it is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from proto.model_config import InfiniteTalkAudioConfig, ModelConfig, get_model_preset, model_preset_names
from workers.model import WanModel

STUDENT_PREFIX = "model."
"""Prefix that causal-student wrappers (CausVid, Self-Forcing, Krea) put in front of every Wan key."""

WrapperChoice = Literal["ema", "generator"]

_WRAPPER_KEYS: dict[str, str] = {"ema": "generator_ema", "generator": "generator"}
_TORCH_SUFFIXES = (".pt", ".pth")
_INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_STEM = "diffusion_pytorch_model"
_MAX_LISTED_PROBLEMS = 8


class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested preset, or that cannot be read."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_dit_checkpoint` did.

    Attributes:
        files: the files read, in order.
        wrapper: the wrapper entry that held the weights (``'generator_ema'``, ``'generator'``) or ``None``.
        stripped_prefix: the key prefix removed from every key (``'model.'``) or ``''``.
        loaded: number of tensors read from the checkpoint.
        zero_initialised: audio tensors missing from the checkpoint, filled with zeros (sorted names).
        source_dtypes: dtypes found in the checkpoint (names, e.g. ``'float32'``).
        dtype: dtype the model now holds (name).
        parameters: number of parameters of the loaded model.
    """

    files: tuple[str, ...]
    wrapper: str | None
    stripped_prefix: str
    loaded: int
    zero_initialised: tuple[str, ...]
    source_dtypes: tuple[str, ...]
    dtype: str
    parameters: int

    def summary(self) -> str:
        """One line per fact, for logs and the CLI."""
        lines = [
            f"files: {', '.join(self.files)}",
            f"wrapper: {self.wrapper or '-'}; stripped prefix: {self.stripped_prefix or '-'}",
            f"loaded {self.loaded} tensors ({', '.join(self.source_dtypes)} -> {self.dtype}), "
            f"{self.parameters:,} parameters",
            f"zero-initialised audio tensors: {len(self.zero_initialised)}",
        ]
        return "\n".join(lines)


class _TensorSource:
    """Uniform lazy access to the tensors of one checkpoint: shapes without reading data, data per key."""

    def __init__(self, files: list[Path], tensors: Mapping[str, Any], opened: ExitStack) -> None:
        self.files = files
        self._tensors = tensors  # key -> torch.Tensor (mmap'd .pt) or (safe_open handle, key)
        self._opened = opened

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        entry = self._tensors[key]
        if isinstance(entry, torch.Tensor):
            return tuple(entry.shape)
        handle, name = entry
        return tuple(handle.get_slice(name).get_shape())

    def dtype_name(self, key: str) -> str:
        entry = self._tensors[key]
        if isinstance(entry, torch.Tensor):
            return str(entry.dtype).removeprefix("torch.")
        handle, name = entry
        return _SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype(), handle.get_slice(name).get_dtype())

    def read(self, key: str) -> torch.Tensor:
        entry = self._tensors[key]
        if isinstance(entry, torch.Tensor):
            return entry
        handle, name = entry
        return handle.get_tensor(name)

    def has(self, key: str) -> bool:
        return key in self._tensors

    def strip_prefix(self, prefix: str, *, keep_others: bool) -> None:
        """Remove `prefix` from every key that has it; drop the other keys unless `keep_others`."""
        self._tensors = {
            (k[len(prefix) :] if k.startswith(prefix) else k): v
            for k, v in self._tensors.items()
            if keep_others or k.startswith(prefix)
        }

    def close(self) -> None:
        self._opened.close()


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _checkpoint_files(path: Path) -> tuple[str, list[Path], dict[str, Path] | None]:
    """Resolve ``path`` to ('safetensors' | 'torch', files, weight_map-or-None)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        indexes = sorted(path.glob(f"*{_INDEX_SUFFIX}"))
        singles = sorted(path.glob("*.safetensors"))
        torch_files = sorted(p for p in path.iterdir() if p.suffix in _TORCH_SUFFIXES)
        if len(indexes) == 1:
            path = indexes[0]
        elif len(indexes) > 1:
            raise CheckpointError(
                f"checkpoint directory {path} holds several index files "
                f"({', '.join(p.name for p in indexes)}); pass the one to load"
            )
        elif len(singles) == 1:
            path = singles[0]
        elif len(singles) == 0 and len(torch_files) == 1:
            path = torch_files[0]
        else:
            found = ", ".join(p.name for p in [*singles, *torch_files]) or "no checkpoint files"
            raise CheckpointError(
                f"checkpoint directory {path} is ambiguous ({found}); pass a file or add a "
                f"*{_INDEX_SUFFIX} describing the shards"
            )
    if path.name.endswith(_INDEX_SUFFIX):
        index = json.loads(path.read_text())
        if "weight_map" not in index:
            raise CheckpointError(f"index {path} has no 'weight_map'")
        weight_map = {key: path.parent / name for key, name in index["weight_map"].items()}
        files = sorted(set(weight_map.values()))
        for shard in files:
            if not shard.exists():
                raise CheckpointError(f"index {path} names shard {shard.name}, which does not exist")
        return "safetensors", files, weight_map
    if path.suffix == ".safetensors":
        return "safetensors", [path], None
    if path.suffix in _TORCH_SUFFIXES:
        return "torch", [path], None
    raise CheckpointError(
        f"checkpoint {path} is neither .safetensors, a *{_INDEX_SUFFIX} nor .pt/.pth"
    )


def _unwrap(obj: Any, prefer: WrapperChoice, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Return the flat state dict inside a causal-student wrapper, or ``obj`` itself when it is flat."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    present = [name for name in _WRAPPER_KEYS.values() if isinstance(obj.get(name), Mapping)]
    if not present:
        return dict(obj), None
    wanted = _WRAPPER_KEYS[prefer]
    chosen = wanted if wanted in present else present[0]
    return dict(obj[chosen]), chosen


def _flat_wrapper(keys: list[str], prefer: WrapperChoice) -> str | None:
    """Wrapper name when a flat file stores ``generator_ema.<key>`` / ``generator.<key>``."""
    present = [name for name in _WRAPPER_KEYS.values() if any(k.startswith(name + ".") for k in keys)]
    if not present:
        return None
    wanted = _WRAPPER_KEYS[prefer]
    return wanted if wanted in present else present[0]


def _open_source(path: Path, prefer: WrapperChoice) -> tuple[_TensorSource, str | None, str]:
    """Open a checkpoint lazily; return the source (keys already in Wan's layout), wrapper and prefix."""
    kind, files, weight_map = _checkpoint_files(path)
    opened = ExitStack()
    wrapper: str | None = None
    if kind == "torch":
        obj = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
        state, wrapper = _unwrap(obj, prefer, files[0])
        non_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if non_tensors:
            raise CheckpointError(
                f"checkpoint {files[0]} entry {non_tensors[0]!r} is a "
                f"{type(state[non_tensors[0]]).__name__}, not a tensor; pass a flat state dict "
                "or a {'generator' | 'generator_ema': state dict} wrapper"
            )
        tensors: dict[str, Any] = state
    else:
        handles = {f: opened.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files}
        if weight_map is None:
            tensors = {key: (handles[files[0]], key) for key in handles[files[0]].keys()}
        else:
            tensors = {key: (handles[f], key) for key, f in weight_map.items()}
    source = _TensorSource(files, tensors, opened)

    keys = source.keys()
    flat = _flat_wrapper(keys, prefer)
    if flat is not None:
        wrapper = flat
        source.strip_prefix(flat + ".", keep_others=False)
        keys = source.keys()
    prefix = STUDENT_PREFIX if keys and all(k.startswith(STUDENT_PREFIX) for k in keys) else ""
    if prefix:
        source.strip_prefix(prefix, keep_others=True)
    return source, wrapper, prefix


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def is_audio_key(key: str) -> bool:
    """True for the audio tensors of either variant (absent from Wan checkpoints, zero-initialised on load):
    any key with "audio" in a module name, and the infinitetalk blocks' `norm_x` (the audio query's norm;
    zero with the rest, the audio output stays zero)."""
    parts = key.split(".")
    return any("audio" in part for part in parts) or "norm_x" in parts


def _checkpoint_family(keys: list[str]) -> tuple[str | None, bool]:
    """(audio variant the keys hold: 'infinitetalk', 'talkingmachines' or None; whether they hold ConvKV
    memory convolutions)."""
    if any(k.startswith("audio_proj.proj1") for k in keys):
        audio: str | None = "infinitetalk"
    elif any(k.startswith("audio_proj.") for k in keys):
        audio = "talkingmachines"
    else:
        audio = None
    return audio, any(".memory_proj_" in k for k in keys)


def _preset_signature(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes that tell the presets apart (Krea tells 1.3B from 14B by blocks.0.self_attn.k.weight)."""
    return {
        "blocks.0.self_attn.k.weight": (config.dim, config.dim),
        "patch_embedding.weight": (config.dim, config.in_dim, *config.patch_size),
    }


def _num_blocks(keys: list[str]) -> int:
    indices = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def _likely_presets(source: _TensorSource, requested: ModelConfig) -> str:
    """A sentence naming the presets whose distinguishing shapes match the checkpoint."""
    keys = source.keys()
    found = {key: source.shape(key) for key in _preset_signature(requested) if source.has(key)}
    if not found:
        return (
            "the checkpoint has neither blocks.0.self_attn.k.weight nor patch_embedding.weight "
            "— is it a Wan DiT?"
        )
    blocks = _num_blocks(keys)
    has_img = any(k.startswith("img_emb.") for k in keys)
    audio, memory = _checkpoint_family(keys)
    matches = []
    for name in model_preset_names():
        candidate = get_model_preset(name)
        signature = _preset_signature(candidate)
        if (
            all(signature[k] == shape for k, shape in found.items())
            and candidate.num_layers == blocks
            and candidate.has_image_branch == has_img
            and audio in (None, candidate.audio_variant)
            and memory == (candidate.memory is not None)
        ):
            matches.append(name)
    seen = ", ".join(f"{k} {_shape_str(s)}" for k, s in found.items())
    described = f"the checkpoint has {seen}, {blocks} blocks, {'an' if has_img else 'no'} image branch"
    if audio is not None:
        described += f", {audio} audio layers"
    if memory:
        described += ", ConvKV memory"
    if requested.name in matches:
        return f"{described}, which fits preset '{requested.name}' — the file itself is inconsistent"
    if matches:
        names = " or ".join(repr(m) for m in matches)
        return f"{described}: it looks like preset {names}, not '{requested.name}' — wrong preset?"
    return (
        f"{described}: no known preset matches (requested '{requested.name}') "
        "— wrong preset or a different model?"
    )


def _check_keys(
    source: _TensorSource, expected: Mapping[str, tuple[int, ...]], config: ModelConfig
) -> list[str]:
    """Validate names and shapes before any tensor data is read; return the audio keys to zero-initialise.

    Audio keys may be missing only all together (a public Wan checkpoint); any other absent, unexpected or
    mis-shaped key raises, listing the problems and the preset the file looks like.
    """
    present = set(source.keys())
    # Audio layers are filled only when the file has none (plain Wan); a partial set means a broken file.
    has_audio = any(is_audio_key(k) for k in present)
    problems: list[str] = []
    for key, shape in expected.items():
        if key in present:
            got = source.shape(key)
            if got != shape:
                problems.append(
                    f"checkpoint key {key} has shape {_shape_str(got)}, "
                    f"the preset expects {_shape_str(shape)}"
                )
        elif not is_audio_key(key) or has_audio:
            problems.append(f"checkpoint lacks key {key} (shape {_shape_str(shape)} in the preset)")
    for key in source.keys():
        if key not in expected:
            problems.append(
                f"checkpoint has unexpected key {key} with shape {_shape_str(source.shape(key))}, "
                "which the preset does not have"
            )
    if problems:
        # The shapes that tell presets apart go first: they explain most of the other mismatches.
        signature = tuple(_preset_signature(config))
        problems.sort(key=lambda p: not any(f" {key} " in p for key in signature))
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        lines = [f"checkpoint {', '.join(str(f) for f in source.files)} does not fit preset '{config.name}':"]
        lines += [f"  - {p}" for p in listed]
        if more:
            lines.append(f"  ... and {more} more")
        lines.append(_likely_presets(source, config))
        raise CheckpointError("\n".join(lines))
    return sorted(k for k in expected if k not in present)


def _config_json_fields(config: ModelConfig) -> dict[str, object]:
    """The fields a published diffusers-style ``config.json`` (Wan's / LiveAct's ``WanModel`` constructor
    arguments) states, as this preset has them."""
    fields: dict[str, object] = {
        "model_type": config.model_type,
        "dim": config.dim,
        "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_layers,
        "in_dim": config.in_dim,
        "out_dim": config.out_dim,
        "text_dim": config.text_dim,
        "text_len": config.text_len,
        "patch_size": list(config.patch_size),
    }
    audio = config.audio
    if isinstance(audio, InfiniteTalkAudioConfig):
        fields.update(
            audio_window=audio.audio_window,
            intermediate_dim=audio.intermediate_dim,
            output_dim=audio.output_dim,
            context_tokens=audio.context_tokens,
            vae_scale=audio.vae_scale,
            norm_input_visual=audio.norm_input_visual,
            norm_output_audio=audio.norm_output_audio,
        )
    return fields


def check_config_json(path: Path, config: ModelConfig) -> None:
    """Refuse a checkpoint folder whose ``config.json`` (the published diffusers-style config) states a model
    other than ``config``, naming every differing field — before any weight is read. A folder without one,
    or a file, is not checked here (the tensor shapes still are)."""
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    try:
        stated = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_file} cannot be read as JSON: {exc}") from exc
    if not isinstance(stated, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object of model settings")
    ours = _config_json_fields(config)
    differ = [
        f"{name}: file {stated[name]!r}, preset {value!r}"
        for name, value in ours.items()
        if name in stated and stated[name] != value
    ]
    if differ:
        raise CheckpointError(
            f"{config_file} describes another model than preset {config.name!r} ({'; '.join(differ)}); "
            "pick the preset of these weights (e.g. --preset soulx-liveact for the LiveAct checkpoint)"
        )


def load_dit_checkpoint(
    path: str | Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict_audio: bool = False,
    prefer: WrapperChoice = "ema",
) -> tuple[WanModel, LoadReport]:
    """Build `WanModel(config)` on the meta device and fill it from a checkpoint, tensor by tensor.

    Args:
        path: a ``.safetensors`` file, a ``*.safetensors.index.json``, a ``.pt``/``.pth`` file, or a
            directory holding exactly one of these.
        config: the preset the checkpoint must fit.
        dtype: cast every floating tensor to this dtype while loading; ``None`` keeps the stored dtype
            (Wan's public DiT files are float32).
        device: where the weights end up.
        strict_audio: when True, a checkpoint without the audio layers is an error instead of being
            zero-initialised.
        prefer: which causal-student wrapper entry to load when a ``.pt`` holds both: ``'ema'``
            (``generator_ema``, default: Self-Forcing's inference weights with ``--use_ema``) or
            ``'generator'`` (the raw student). When only one entry exists it is used either way and the
            report says which.

    Returns:
        The model in eval mode with ``requires_grad`` off, and a :class:`LoadReport`.

    Raises:
        CheckpointError: unreadable file, or any missing (non-audio), unexpected or mis-shaped key; the
            message names every offending key with both shapes and the preset the file looks like.
    """
    device = torch.device(device)
    check_config_json(Path(path), config)
    with torch.device("meta"):
        model = WanModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    source, wrapper, prefix = _open_source(Path(path), prefer)
    try:
        zero_keys = _check_keys(source, expected, config)
        if zero_keys and strict_audio:
            raise CheckpointError(
                f"checkpoint {path} lacks {len(zero_keys)} audio tensors (first: {zero_keys[0]}) and "
                "strict_audio=True; pass strict_audio=False to zero-initialise them (plain Wan behaviour)"
            )
        source_dtypes = sorted({source.dtype_name(k) for k in source.keys()})
        state: dict[str, torch.Tensor] = {}
        for key in source.keys():
            tensor = source.read(key)
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            state[key] = tensor.to(device=device, dtype=target)
        zero_dtype = dtype or _majority_dtype(state)
        for key in zero_keys:
            state[key] = torch.zeros(expected[key], dtype=zero_dtype, device=device)
        model.load_state_dict(state, strict=True, assign=True)
    finally:
        source.close()
    model.eval().requires_grad_(False)
    report = LoadReport(
        files=tuple(str(f) for f in source.files),
        wrapper=wrapper,
        stripped_prefix=prefix,
        loaded=len(state) - len(zero_keys),
        zero_initialised=tuple(zero_keys),
        source_dtypes=tuple(source_dtypes),
        dtype=str(zero_dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return model, report


def _majority_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32


def _shard_groups(state: Mapping[str, torch.Tensor], shards: int) -> Iterator[dict[str, torch.Tensor]]:
    """Split `state` in key order into `shards` groups of roughly equal bytes."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    budget = math.ceil(total / shards)
    group: dict[str, torch.Tensor] = {}
    size = 0
    emitted = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > budget and emitted < shards - 1:
            yield group
            emitted += 1
            group, size = {}, 0
        group[key] = tensor
        size += nbytes
    yield group


def save_dit_checkpoint(
    model: torch.nn.Module,
    path: str | Path,
    *,
    shards: int | None = None,
    prefix: str = "",
) -> Path:
    """Write `model.state_dict()` in Wan's layout, every key prefixed with `prefix` (``'model.'`` = student).

    - ``path`` ending in ``.pt``/``.pth``: one ``torch.save`` file.
    - ``path`` ending in ``.safetensors`` and ``shards`` None: one safetensors file.
    - ``shards`` = n: n safetensors files named like Wan's (``<stem>-0000i-of-0000n.safetensors``) next to
      ``<stem>.safetensors.index.json``; ``path`` is either ``<dir>/<stem>.safetensors`` or a directory
      (stem ``diffusion_pytorch_model``).

    Returns the file to pass to :func:`load_dit_checkpoint` (the index for shards).
    """
    path = Path(path)
    state = {prefix + k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if path.suffix in _TORCH_SUFFIXES:
        if shards is not None:
            raise ValueError(f"shards={shards} needs a .safetensors path or a directory, got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return path
    if shards is None:
        if path.suffix != ".safetensors":
            raise ValueError(f"save path {path} must end in .safetensors, .pt or .pth (or pass shards=n)")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path))
        return path
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if path.suffix == ".safetensors":
        directory, stem = path.parent, path.stem
    else:
        directory, stem = path, _SHARD_STEM
    directory.mkdir(parents=True, exist_ok=True)
    groups = list(_shard_groups(state, shards))
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(directory / name))
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = directory / f"{stem}{_INDEX_SUFFIX}"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index
