"""The fine-tuned model as a folder in the hub's layout, with its revision recorded.

`configuration.json` is the base model's, plus a `capworks_finetune` section: the base model,
its revision and caption identity, the data hash, steps, options and held-out metrics, and a
revision name. A local folder's caption identity is a hash of `configuration.json` and the
weights (`schema.checkpoint.folder_model_id`), so the fine-tuned folder is a new model wherever
it is mounted, and its captions sit beside the base model's. `weights.sha256` is written too,
so a producer host can hold the identity without the weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from capworks.schema.checkpoint import WEIGHTS_HASH_FILE, CheckpointConfig, file_sha256

RECORD_KEY = "capworks_finetune"
COPIED = ("config.json", "pytorch_model.bin", "vocab.json", "merges.txt")


def revision_name(record: dict[str, Any]) -> str:
    """A short, stable name for this fine-tune: the data and how long it trained on it."""
    blob = json.dumps(
        {k: record[k] for k in ("base", "data_hash", "steps", "options")}, sort_keys=True
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:6]
    return f"ft-{record['data_hash'][:8]}-{record['steps']}s-{digest}"


def finetune_record(
    base: CheckpointConfig,
    data_hash: str,
    steps: int,
    options: dict[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """What `configuration.json` records about the fine-tune."""
    model_id, revision, settings_hash = base.identity
    record: dict[str, Any] = {
        "base": {"model_id": model_id, "revision": revision, "settings_hash": settings_hash},
        "data_hash": data_hash,
        "steps": steps,
        "options": options,
        "metrics": metrics,
    }
    record["revision"] = revision_name(record)
    return record


def write_model_folder(
    trained: Path, base: CheckpointConfig, record: dict[str, Any], out: Path
) -> None:
    """Write the folder atomically: built beside `out` and renamed into place when complete (an
    existing `out` is replaced)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        work = Path(tmp) / out.name
        work.mkdir()
        for name in COPIED:
            shutil.copyfile(trained / name, work / name)
        configuration = json.loads((base.model_dir / "configuration.json").read_text())
        configuration[RECORD_KEY] = record
        (work / "configuration.json").write_text(json.dumps(configuration, indent=4))
        digest = file_sha256(work / "pytorch_model.bin", Path(tmp) / ".hash-cache")
        (work / WEIGHTS_HASH_FILE).write_text(f"{digest}  pytorch_model.bin\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
