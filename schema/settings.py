"""One settings object for all of capworks, read once from `CAPWORKS_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "damo/ofa_image-caption_coco_distilled_en"


def default_cache_dir() -> Path:
    """Where built checkpoints live: outside the repository, per user."""
    return Path.home() / ".cache" / "capworks"


class Settings(BaseSettings):
    """Every knob of capworks; each field is `CAPWORKS_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="CAPWORKS_", extra="ignore")

    # Model
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = Field(default=8, ge=1)
    cache_dir: Path = Field(default_factory=default_cache_dir)

    # Storage
    database_url: str = "sqlite:///capworks.db"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str = "auto"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    http_timeout_s: float = 30.0

    # Image validation (defaults from the model card's service limits)
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_px: int = 3000
    decode_threads: int = 0

    @property
    def checkpoint_dir(self) -> Path:
        """Folder of checkpoints built offline by `capworks checkpoint build`."""
        return self.cache_dir / "checkpoints"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings()
