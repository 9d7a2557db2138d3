"""Find a checkpoint (local directory or Hugging Face repo id), read its safetensors lazily,
map checkpoint names to ours, and check that every tensor is there with the right shape.

Three kinds of checkpoint load: Hugging Face originals (`model.language_model.*`, torch layout),
ours (written by `mlx_gemma3n.convert`: the same names and layouts, towers and the PLE table in
files of their own, quantized weights as MLX's `weight`/`scales`/`biases`), and mlx-vlm's
conversions (`language_model.model.*`, tower kernels already in MLX layout).

Knows names and shapes, nothing about layers; layout quirks of a tower live in its `sanitize`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ConfigError, ModelConfig, load_config
from .errors import CheckpointError


# What a download needs; the PLE table and towers come with the safetensors.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]

# Checkpoint prefix -> our module path: Hugging Face's names (also ours), then mlx-vlm's.
_PREFIXES = (
    ("model.vision_tower.timm_model.", "vision_tower."),
    ("model.audio_tower.", "audio_tower."),
    ("model.language_model.", "language_model."),
    ("model.embed_vision.", "embed_vision."),
    ("model.embed_audio.", "embed_audio."),
)
_MLX_VLM_PREFIXES = (
    ("vision_tower.timm_model.", "vision_tower."),
    ("audio_tower.", "audio_tower."),
    ("language_model.model.", "language_model."),
    ("embed_vision.", "embed_vision."),
    ("embed_audio.", "embed_audio."),
)
PLE_NAME = "language_model.embed_tokens_per_layer"  # our module path of the Per-Layer Embedding table
# Written into the safetensors metadata of our converted files, so that files from two
# different models cannot be mixed silently.
FINGERPRINT_KEY = "mlx_gemma3n.model_fingerprint"
# KV-shared layers compute no keys or values; published files still carry these (unused).
_SHARED_LAYER_UNUSED = ("k_proj", "v_proj", "k_norm", "v_norm")


def resolve(model: str | Path) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded (only the files needed)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the checkpoint's directory (the one holding config.json).")
        return path
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model} does not exist: give a checkpoint directory or a Hugging Face repo id.")
    return download(str(model))


def download(repo_id: str) -> Path:
    """The files of `repo_id` we need, from the Hub's cache, fetched first when missing or stale.

    Every request has a timeout (`HF_HUB_ETAG_TIMEOUT`, 10 s unless set): snapshot_download's
    first request has none, so a Hub that accepts connections but never answers hung it for good.
    Files come one at a time on the calling thread, each with the Hub's own progress bar on a
    terminal, so that Ctrl-C stops at once (a download thread would finish its file first); the
    Hub's cache keeps the partial file and resumes it next time. Unreachable, the Hub's cache
    serves what it holds, as snapshot_download does.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        return _cached(repo_id) or _refuse(repo_id, RuntimeError("HF_HUB_OFFLINE is set"))
    timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        info = HfApi().model_info(repo_id, timeout=timeout)
        files = [s.rfilename for s in info.siblings or ()
                 if any(fnmatch.fnmatch(s.rfilename, p) for p in DOWNLOAD_PATTERNS)]
        # By branch, not by info.sha: the cache then records the branch's commit, which loading offline needs.
        paths = [hf_hub_download(repo_id, f, etag_timeout=timeout) for f in files]
    except Exception as e:  # the Hub raises many kinds; the person needs one sentence
        if _unreachable(e) and (cached := _cached(repo_id)) is not None:
            return cached
        _refuse(repo_id, e, timeout)
    snapshots = {path[: -len(f)] for path, f in zip(paths, files)}
    if not snapshots:
        raise CheckpointError(f"{repo_id} on the Hugging Face Hub holds no config or weights: check the name.")
    if len(snapshots) > 1:
        raise CheckpointError(f"{repo_id} changed on the Hugging Face Hub while it downloaded: run again to fetch the new version.")
    return Path(snapshots.pop())


def _cached(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, local_files_only=True))
    except Exception:
        return None


def _unreachable(e: Exception) -> bool:
    """A timeout or a failed connection, whichever HTTP library the Hub client uses."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TimeoutError", "ConnectionError", "ConnectError"}) or any("Timeout" in n for n in names)


def _refuse(repo_id: str, e: Exception, timeout: float = 0):
    from huggingface_hub import constants

    hub = f"The Hugging Face Hub at {constants.ENDPOINT}"
    names = {c.__name__ for c in type(e).__mro__}
    status = getattr(getattr(e, "response", None), "status_code", None)
    text = str(e).lower()
    if any("Timeout" in n for n in names):
        message = f"{hub} did not answer within {timeout:g} s: check your connection, or pass a local directory."
    elif _unreachable(e):
        reason = ("it refused the connection" if "refused" in text
                  else "its name does not resolve" if "name" in text or "getaddrinfo" in text else "no connection")
        message = f"{hub} cannot be reached ({reason}): check your connection, or pass a local directory."
    elif "GatedRepoError" in names:
        message = f"{repo_id} is gated on the Hugging Face Hub: accept its licence on its page, then log in with `hf auth login`."
    elif "RepositoryNotFoundError" in names:
        message = f"{repo_id} is not a model on the Hugging Face Hub (or it is private): check the name, or log in with `hf auth login`."
    elif "HF_HUB_OFFLINE" in str(e):
        message = f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download, or pass a local directory."
    elif status is not None:
        message = f"{hub} answered HTTP {status} for {repo_id}: try again later, or pass a local directory."
    else:
        message = f"Could not download {repo_id} from the Hugging Face Hub ({type(e).__name__}): try again, or pass a local directory."
    raise CheckpointError(message) from None


def model_fingerprint(raw_config: dict) -> str:
    """A short hash of what fixes the tensor shapes (the text, vision and audio configs)."""
    keys = ("text_config", "vision_config", "audio_config")
    arch = {k: raw_config.get(k) for k in keys} if "text_config" in raw_config else raw_config
    arch = json.loads(json.dumps(arch, sort_keys=True, default=str))
    for section in arch.values() if "text_config" in raw_config else [arch]:
        if isinstance(section, dict):  # bookkeeping keys that say nothing about shapes
            for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path", "quantization"):
                section.pop(k, None)
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes lie in a safetensors file (for memory-mapped reads)."""

    file: Path
    offset: int  # of the first byte, from the start of the file
    dtype: str  # safetensors dtype: "BF16", "F16", "F32", "U32", ...
    shape: tuple[int, ...]


def _safetensors_header(file: Path, with_layout: bool = False):
    """Read and check a safetensors header, so a truncated download fails here, by name."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file} is truncated or empty ({size} bytes): download it again.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file} is truncated (its header alone claims {n} bytes): download it again.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header).") from None
    metadata = header.pop("__metadata__", None) or {}
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < end:
        raise CheckpointError(f"{file} is truncated ({size} of {end} bytes): download it again.")
    return (header, metadata, 8 + n) if with_layout else header


@dataclass
class Checkpoint:
    """A checkpoint on disk: its config and where each of its tensors lies."""

    path: Path
    config: ModelConfig
    locations: dict[str, TensorLocation]  # checkpoint name -> file, offset, dtype, shape
    opened: set[Path] = field(default_factory=set)  # files read so far (towers load on demand)
    read_names: set[str] = field(default_factory=set)  # checkpoint names read so far
    layout: str = "hf"  # "hf" (Hugging Face's names and layouts; also ours) or "mlx-vlm"

    @classmethod
    def open(cls, model: str | Path) -> "Checkpoint":
        path = resolve(model)
        try:
            config = load_config(path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            names_by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                names_by_file.setdefault(file, []).append(name)
            for file in names_by_file:
                if not (path / file).exists():
                    raise CheckpointError(f"{path / file} is missing: the index lists it; download it again.")
            files = sorted(path / f for f in names_by_file)
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors weights.")
        locations = {}
        fingerprint = model_fingerprint(config.raw)
        for file in files:
            header, metadata, data_start = _safetensors_header(file, with_layout=True)
            theirs = metadata.get(FINGERPRINT_KEY)
            if theirs is not None and theirs != fingerprint:
                raise CheckpointError(
                    f"{file} was converted from another model than the one {path / 'config.json'} describes "
                    "(its model fingerprint differs): convert the checkpoint again into an empty directory."
                )
            for name, info in header.items():
                offset = data_start + info["data_offsets"][0]
                locations[name] = TensorLocation(file, offset, info["dtype"], tuple(info["shape"]))
        layout = "mlx-vlm" if any(n.startswith("language_model.model.") for n in locations) else "hf"
        return cls(path, config, locations, layout=layout)

    @property
    def quantized(self) -> bool:
        return any(name.endswith(".scales") for name in self.locations)

    def names_for(self, ours: str) -> dict[str, str]:
        """Checkpoint names of the tensors of our module path `ours` (a suffix -> name map:
        "weight", and "scales"/"biases" when quantized)."""
        found = {}
        for name in self.locations:
            mapped = self.our_name(name)
            if mapped is not None and mapped.startswith(ours + "."):
                found[mapped[len(ours) + 1:]] = name
        return found

    def our_name(self, name: str) -> str | None:
        """Our parameter path for a checkpoint name, or None for tensors we do not use."""
        if name == "lm_head.weight":  # tied to embed_tokens
            return None
        if self.layout == "mlx-vlm" and name.startswith("language_model.lm_head."):
            return None
        for theirs, ours in _MLX_VLM_PREFIXES if self.layout == "mlx-vlm" else _PREFIXES:
            if name.startswith(theirs):
                ours = ours + name[len(theirs):]
                break
        else:
            return name
        parts = ours.split(".")
        if parts[:2] == ["language_model", "layers"] and parts[3] == "self_attn" and parts[4] in _SHARED_LAYER_UNUSED:
            if int(parts[2]) >= self.config.text.first_kv_shared_layer:  # KV-shared: its k/v are never used
                return None
        return ours

    def read(self, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, mx.array]:
        """Every tensor whose (our) name starts with `prefix` (and not with one of `skip`),
        lazily, named below the prefix. Records which files and tensors were read."""
        wanted = {}
        for name, where in self.locations.items():
            ours = self.our_name(name)
            if ours is not None and ours.startswith(prefix) and not ours.startswith(skip):
                wanted.setdefault(where.file, {})[name] = ours[len(prefix):]
        out = {}
        for file, names in wanted.items():
            self.opened.add(file)
            self.read_names.update(names)
            tensors = mx.load(str(file))
            for theirs, ours in names.items():
                out[ours] = _to_torch_layout(prefix + ours, tensors[theirs]) if self.layout == "mlx-vlm" else tensors[theirs]
        return out


def _to_torch_layout(name: str, w: mx.array) -> mx.array:
    """mlx-vlm saves tower kernels in MLX layout; put them back in torch layout, which is what
    the towers' `sanitize` takes (so that every checkpoint reaches it the same way)."""
    if name.startswith("vision_tower.") and w.ndim == 4:
        return w.transpose(0, 3, 1, 2)  # (O, kH, kW, I) -> (O, I, kH, kW)
    if name.startswith("audio_tower."):
        if w.ndim == 4:
            return w.transpose(0, 3, 1, 2)
        if w.ndim == 3 and name.endswith("depthwise_conv1d.weight"):
            return w.transpose(0, 2, 1)  # (O, K, I) -> (O, I, K)
    return w


def load_into(module, weights: dict[str, mx.array], what: str, path: Path, dtype: mx.Dtype | None) -> None:
    """Load `weights` into `module`, first checking names and shapes so that a mismatch is one sentence."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(
            f"{path}: the {what} is missing {len(missing)} tensors (e.g. {', '.join(missing[:3])}); "
            "the checkpoint is incomplete or does not match its config.json."
        )
    if unexpected:
        raise CheckpointError(
            f"{path}: the {what} has {len(unexpected)} tensors its config.json does not call for "
            f"(e.g. {', '.join(unexpected[:3])}); the checkpoint does not match its config."
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {what} tensor {name} has shape {tuple(value.shape)}, but config.json implies "
                f"{tuple(expected[name].shape)}."
            )
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    module.load_weights(list(weights.items()), strict=True)
