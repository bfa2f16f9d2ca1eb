"""Finding a checkpoint (ModelScope hub id + revision, or a local folder) and reading its settings.

A checkpoint folder has the hub's layout: `configuration.json` (ModelScope's task settings),
`config.json` (the OFA architecture), `pytorch_model.bin`, `vocab.json` and `merges.txt`.

Both JSON files are checked before anything loads (`schema.checkpoint_limits`): `config.json`
may not name `resnet_model_path` (a file ModelScope would `torch.load`), and the sizes, the
resolution and the beam-search numbers are bounded.

A hub checkpoint is known by its id and revision, an offline-built one by its name, and a local
folder by its contents (`folder_model_id`), never its path: hosts that mount one checkpoint at
different paths serve one caption identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capworks.schema.checkpoint_limits import check_architecture, check_configuration
from capworks.schema.errors import CheckpointError

log = logging.getLogger(__name__)

REQUIRED_FILES = (
    "configuration.json",
    "config.json",
    "pytorch_model.bin",
    "vocab.json",
    "merges.txt",
)
# Checkpoints that `capworks checkpoint build NAME` makes offline, in the hub's layout.
OFFLINE_NAMES = ("shapes", "tiny-random", "large-random", "tiny-wide")
# A local folder's recorded weights hash, as `sha256sum pytorch_model*.bin *.safetensors` writes
# it: a producer host that holds only `configuration.json` and this file knows the identity.
WEIGHTS_HASH_FILE = "weights.sha256"
WEIGHTS_PATTERNS = ("pytorch_model*.bin", "*.safetensors")
FOLDER_ID_PREFIX = "local:"
HASH_CHUNK_BYTES = 8 * 1024 * 1024
HUB_PROBE_S = 5.0  # how long the ModelScope hub gets to answer a connect before it counts as down
DEFAULT_PROMPT = " what does the image describe?"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class GenerationSettings:
    """Beam-search settings; defaults are ModelScope's for OFA captioning."""

    beam_size: int = 5
    max_len_a: float = 0.0
    max_len_b: int = 16
    min_len: int = 1
    no_repeat_ngram_size: int = 3
    len_penalty: float = 1.0
    normalize_scores: bool = True
    temperature: float = 1.0
    unk_penalty: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        return asdict(self)

    def digest(self) -> str:
        """A short stable hash, part of a caption's identity in the database."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class CheckpointConfig:
    """What `configuration.json` says about prompting, preprocessing and generation."""

    model_dir: Path
    model_id: str
    revision: str
    prompt: str = DEFAULT_PROMPT
    patch_image_size: int = 480
    imagenet_default_mean_and_std: bool = False
    max_src_length: int = 256
    language: str = "en"
    num_return_sequences: int = 1
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    @property
    def mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel mean and std for normalising pixels in [0, 1]."""
        if self.imagenet_default_mean_and_std:
            return IMAGENET_MEAN, IMAGENET_STD
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    @property
    def identity(self) -> tuple[str, str, str]:
        """What makes two captions comparable: model id, revision, generation settings hash."""
        return self.model_id, self.revision, self.generation.digest()


def read_config(model_dir: Path, model_id: str, revision: str = "") -> CheckpointConfig:
    """Read `configuration.json` of a checkpoint folder, with ModelScope's defaults."""
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"{model_dir} is not an OFA checkpoint: missing {', '.join(missing)}")
    check_architecture(model_dir / "config.json")
    return _from_configuration(model_dir, model_id, revision)


def _from_configuration(model_dir: Path, model_id: str, revision: str) -> CheckpointConfig:
    try:
        cfg = json.loads((model_dir / "configuration.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}/configuration.json cannot be read: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{model_dir}/configuration.json: not a JSON object")
    model = cfg.get("model", {})
    check_configuration(model, model_dir / "configuration.json")
    known = GenerationSettings.__dataclass_fields__
    beam = {k: v for k, v in model.get("beam_search", {}).items() if k in known}
    return CheckpointConfig(
        model_dir=model_dir,
        model_id=model_id,
        revision=revision,
        prompt=model.get("prompt", DEFAULT_PROMPT),
        patch_image_size=int(model.get("patch_image_size", 480)),
        imagenet_default_mean_and_std=bool(model.get("imagenet_default_mean_and_std", False)),
        max_src_length=int(model.get("max_src_length", 256)),
        language=model.get("language", "en"),
        num_return_sequences=int(model.get("num_return_sequences", 1)),
        generation=GenerationSettings(**beam),
    )


def resolve_checkpoint(model: str, revision: str | None, checkpoint_dir: Path) -> CheckpointConfig:
    """Find the folder of `model`: a local folder, an offline-built name, or a ModelScope hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        config = read_config(folder, model_id="", revision=revision or "")
        return replace(config, model_id=folder_model_id(folder, checkpoint_dir))
    if model in OFFLINE_NAMES:
        built = checkpoint_dir / model
        if not built.is_dir():
            raise CheckpointError(
                f"checkpoint {model!r} is not built yet: run `capworks checkpoint build {model}`"
            )
        return read_config(built, model_id=model, revision=revision or "")
    return read_config(download_from_hub(model, revision), model_id=model, revision=revision or "")


def resolve_identity(
    model: str, revision: str | None, checkpoint_dir: Path
) -> tuple[str, str, str]:
    """The caption identity of `model` from its `configuration.json` (and, for a local folder,
    its weights or their recorded hash): a producer host needs no weights (a hub id downloads
    that one file, not the checkpoint)."""
    path = Path(model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        model_id = folder_model_id(folder, checkpoint_dir)
    elif model in OFFLINE_NAMES:
        folder, model_id = checkpoint_dir / model, model
        if not (folder / "configuration.json").is_file():
            raise CheckpointError(
                f"checkpoint {model!r} is not built yet: run `capworks checkpoint build {model}`"
            )
    else:
        folder, model_id = download_configuration(model, revision), model
    return _from_configuration(folder, model_id, revision or "").identity


def folder_model_id(folder: Path, checkpoint_dir: Path) -> str:
    """A local checkpoint folder's model id from its contents, the same at any path:
    `local:` and a hash of `configuration.json` and of the weights' hashes. The weights' hashes
    are read from `weights.sha256` when the folder has one, else computed once per file version
    (cached under `checkpoint_dir` by path, size and modification time)."""
    try:
        configuration = (folder / "configuration.json").read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{folder}/configuration.json cannot be read: {exc}") from exc
    digest = hashlib.sha256(configuration)
    for name, weights_hash in weights_hashes(folder, checkpoint_dir):
        digest.update(f"\n{weights_hash}  {name}".encode())
    return FOLDER_ID_PREFIX + digest.hexdigest()[:24]


def weights_hashes(folder: Path, checkpoint_dir: Path) -> list[tuple[str, str]]:
    """(file name, SHA-256) of each weights file of `folder`, sorted by name."""
    recorded = folder / WEIGHTS_HASH_FILE
    if recorded.is_file():
        return _read_hash_file(recorded)
    files = sorted({f for pattern in WEIGHTS_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    if not files:
        raise CheckpointError(
            f"{folder} holds no weights ({', '.join(WEIGHTS_PATTERNS)}) and no {WEIGHTS_HASH_FILE}:"
            f" a folder's identity is its contents; beside configuration.json put the output of"
            f" `sha256sum pytorch_model.bin` as {WEIGHTS_HASH_FILE}"
        )
    return [(f.name, file_sha256(f, checkpoint_dir / ".weights-sha256")) for f in files]


def _read_hash_file(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for line in path.read_text().splitlines():
        parts = line.split(maxsplit=1)
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise CheckpointError(f"{path}: {line!r} is not a `sha256sum` line (hash  name)")
        pairs.append((parts[1].lstrip("*"), parts[0].lower()))
    if not pairs:
        raise CheckpointError(f"{path} names no weights file")
    return sorted(pairs)


def file_sha256(path: Path, cache: Path) -> str:
    """The SHA-256 of a file, computed once per (path, size, modification time): the answer is
    kept in `cache`; a cache that cannot be written only costs the hash again."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    entry = cache / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        known = entry.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass  # not hashed yet
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    value = digest.hexdigest()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = entry.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(value)
        partial.replace(entry)
    except OSError as exc:
        log.warning("weights hash of %s not cached (%s); it is computed again next time", path, exc)
    return value


def download_configuration(model_id: str, revision: str | None) -> Path:
    """The folder holding a hub checkpoint's `configuration.json`, downloaded alone."""
    from modelscope.hub.file_download import model_file_download  # slow import, only when needed

    def fetch(local_files_only: bool) -> Path:
        got = model_file_download(
            model_id, "configuration.json", revision=revision, local_files_only=local_files_only
        )
        return Path(got).parent

    return from_cache_or_hub(model_id, "the configuration.json", fetch)


def download_from_hub(model_id: str, revision: str | None) -> Path:
    """Download (or find in ModelScope's cache) a hub checkpoint; one clear error if impossible."""
    from modelscope.hub.snapshot_download import snapshot_download  # slow import, only when needed

    def fetch(local_files_only: bool) -> Path:
        return Path(
            snapshot_download(model_id, revision=revision, local_files_only=local_files_only)
        )

    return from_cache_or_hub(model_id, "the checkpoint", fetch)


def from_cache_or_hub(model_id: str, what: str, fetch: Callable[[bool], Path]) -> Path:
    """`fetch(local_files_only)` once a probe shows the hub answers, else from ModelScope's
    cache: offline, the hub client retries for a minute before it gives up (even when asked for
    local files only, it first asks the hub for the revision), so an unreachable hub with no
    cached copy is refused in seconds instead. Errors are whole, never cut."""
    # The hub client sets its own logger to INFO on import and logs every retry; keep its
    # retries out of a failing command's one-line error unless we run verbose.
    quiet = logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR
    logging.getLogger("modelscope_hub").setLevel(quiet)
    offline_hint = (
        f"offline, pass --model with one of {', '.join(OFFLINE_NAMES)} (built here, no hub) "
        f"or a local folder holding {', '.join(REQUIRED_FILES)}"
    )
    unreachable = hub_unreachable()
    if unreachable is not None and not in_hub_cache(model_id):
        raise CheckpointError(
            f"cannot fetch {what} of {model_id!r}: ModelScope's cache does not hold it and the "
            f"ModelScope hub cannot be reached ({unreachable}); {offline_hint}"
        )
    try:
        return fetch(unreachable is not None)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many unrelated types
        reason = " ".join(str(exc).split()) or type(exc).__name__
        where = "the ModelScope hub" if unreachable is None else "ModelScope's cache (hub down)"
        raise CheckpointError(
            f"cannot fetch {what} of {model_id!r} from {where} ({reason}); {offline_hint}"
        ) from exc


def in_hub_cache(model_id: str) -> bool:
    """Whether ModelScope's cache has a folder for `model_id`, in its layout or an older one."""
    from modelscope.hub.utils.utils import find_reusable_legacy_repo_dir
    from modelscope_hub.config import get_default_config

    current = Path(get_default_config().cache_dir) / "models" / model_id.replace("/", "--")
    return current.is_dir() or bool(find_reusable_legacy_repo_dir(model_id, repo_type="model"))


def hub_unreachable(timeout_s: float = HUB_PROBE_S) -> str | None:
    """Why the ModelScope hub the hub client would use (`MODELSCOPE_ENDPOINT`, else its
    default) does not answer a TCP connect within `timeout_s`, or None when it does. Probed on
    a thread of its own: name resolution has no timeout of its own."""
    from modelscope_hub.config import get_default_config

    endpoint = str(get_default_config().endpoint)
    parts = urlsplit(endpoint)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"{endpoint}: {exc.strerror or exc}")

    thread = threading.Thread(target=probe, daemon=True, name="capworks-hub-probe")
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"{endpoint}: no answer within {timeout_s:.0f} s"
