"""Finding a checkpoint (ModelScope hub id + revision, or a local folder) and reading its settings.

A checkpoint folder has the hub's layout: `configuration.json` (ModelScope's task settings),
`config.json` (the OFA architecture), `pytorch_model.bin`, `vocab.json` and `merges.txt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schema.errors import CheckpointError

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
    return _from_configuration(model_dir, model_id, revision)


def _from_configuration(model_dir: Path, model_id: str, revision: str) -> CheckpointConfig:
    try:
        cfg = json.loads((model_dir / "configuration.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}/configuration.json cannot be read: {exc}") from exc
    model = cfg.get("model", {})
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
        return read_config(path.resolve(), model_id=str(path.resolve()), revision=revision or "")
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
    """The caption identity of `model` from its `configuration.json` alone: a producer host needs
    no weights (a hub id downloads that one file, not the checkpoint)."""
    path = Path(model).expanduser()
    if path.is_dir():
        folder, model_id = path.resolve(), str(path.resolve())
    elif model in OFFLINE_NAMES:
        folder, model_id = checkpoint_dir / model, model
        if not (folder / "configuration.json").is_file():
            raise CheckpointError(
                f"checkpoint {model!r} is not built yet: run `capworks checkpoint build {model}`"
            )
    else:
        folder, model_id = download_configuration(model, revision), model
    return _from_configuration(folder, model_id, revision or "").identity


def download_configuration(model_id: str, revision: str | None) -> Path:
    """The folder holding a hub checkpoint's `configuration.json`, downloaded alone."""
    from modelscope.hub.file_download import model_file_download  # slow import, only when needed

    try:
        return Path(model_file_download(model_id, "configuration.json", revision=revision)).parent
    except Exception as exc:  # noqa: BLE001 - the hub client raises many unrelated types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot fetch {model_id}'s configuration.json: {reason}") from exc


def download_from_hub(model_id: str, revision: str | None) -> Path:
    """Download (or find in ModelScope's cache) a hub checkpoint; one clear error if impossible."""
    from modelscope.hub.snapshot_download import snapshot_download  # slow import, only when needed

    # The hub client sets its own logger to INFO on import and logs every retry; keep its
    # retries out of a failing command's one-line error unless we run verbose.
    quiet = logging.WARNING if log.isEnabledFor(logging.INFO) else logging.ERROR
    logging.getLogger("modelscope_hub").setLevel(quiet)
    try:
        return Path(snapshot_download(model_id, revision=revision))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many unrelated types
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot fetch {model_id!r} from the ModelScope hub ({reason}); pass --model with a "
            f"local folder holding {', '.join(REQUIRED_FILES)}"
        ) from exc
