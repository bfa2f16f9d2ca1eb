"""Resolving a `--model` for the commands and the Python API, saying at once what happens.

An offline name is built on first use (minutes, with a progress bar), a local folder is read, and
a hub id is announced before ModelScope's slow client starts; a hub id that neither ModelScope's
cache holds nor the hub answers for fails at once (see `schema.checkpoint`), naming the offline
checkpoints that need no hub.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from capworks.checkpoints.layout import BUILD_DURATIONS, is_current_build
from capworks.schema.checkpoint import (
    OFFLINE_NAMES,
    CheckpointConfig,
    resolve_checkpoint,
    resolve_identity,
)
from capworks.schema.settings import Settings

log = logging.getLogger(__name__)
Say = Callable[[str], None]


def resolve_model(
    model: str, revision: str | None, settings: Settings, say: Say = log.info
) -> CheckpointConfig:
    """The checkpoint `model` names, built or downloaded first when needed; `say` hears what
    is being built or fetched before it starts."""
    if model in OFFLINE_NAMES:
        if not is_current_build(settings.checkpoint_dir / model, model):
            say(f"building the offline {model!r} checkpoint: {BUILD_DURATIONS.get(model, '')}")
            # Imported only to build: it imports torch, which a worker's supervisor never needs.
            from capworks.checkpoints.build import ensure_checkpoint

            ensure_checkpoint(model, settings.checkpoint_dir)
    elif not Path(model).expanduser().is_dir():
        say(hub_line(model, revision, "the checkpoint"))
    return resolve_checkpoint(model, revision, settings.checkpoint_dir)


def resolve_model_identity(
    model: str, revision: str | None, settings: Settings, say: Say = log.info
) -> tuple[str, str, str]:
    """The caption identity of `model` (its `configuration.json` alone, no weights), with the
    same announcement for a hub id."""
    if model not in OFFLINE_NAMES and not Path(model).expanduser().is_dir():
        say(hub_line(model, revision, "its configuration.json"))
    return resolve_identity(model, revision, settings.checkpoint_dir)


def hub_line(model: str, revision: str | None, what: str) -> str:
    """What is about to be looked up for a hub id, and how to avoid the hub."""
    at = f" at revision {revision}" if revision else ""
    return (
        f"model {model!r}{at} is a ModelScope hub id: looking for {what} in ModelScope's cache, "
        f"then on the hub (offline, use a local folder or one of {', '.join(OFFLINE_NAMES)})"
    )
