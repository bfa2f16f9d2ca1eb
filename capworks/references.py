"""Reading reference captions: a COCO captions JSON (`images[{id, file_name}]` and
`annotations[{image_id, caption}]`), or JSONL / CSV rows of `uri,caption` (several rows per image).

Every image is named by the URI capworks stores it under: a local file's absolute path, an
`s3://` URI or an http(s) URL. A relative name is taken under `images_root` (by default the
folder of the references file).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from schema.uris import file_uri, is_http, is_s3

References = dict[str, list[str]]


class ReferenceError(ValueError):
    """A references file that cannot be read: its name, where, and what is wrong, in one line."""


def load_references(path: Path, images_root: str | None = None) -> References:
    """The reference captions of each image (by URI, in file order) from a .json, .jsonl or .csv."""
    if not path.is_file():
        raise ReferenceError(f"no such references file: {path}")
    root = images_root if images_root is not None else str(path.resolve().parent)
    suffix = path.suffix.lower()
    if suffix == ".json":
        refs = _read_coco(path, root)
    elif suffix == ".jsonl":
        refs = _read_jsonl(path, root)
    elif suffix == ".csv":
        refs = _read_csv(path, root)
    else:
        raise ReferenceError(f"{path}: references must be .json (COCO), .jsonl or .csv")
    if not refs:
        raise ReferenceError(f"{path}: no reference captions")
    return refs


def image_uri(name: str, root: str) -> str:
    """The URI of an image named in a references file: as given when absolute, else under root."""
    if is_s3(name) or is_http(name):
        return name
    if Path(name).is_absolute():
        return file_uri(Path(name))
    if is_s3(root) or is_http(root):
        return root.rstrip("/") + "/" + name.lstrip("/")
    return file_uri(Path(root) / name)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV starts with a BOM
    except UnicodeDecodeError as exc:
        raise ReferenceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _caption(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReferenceError(f"{where}: caption must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _read_coco(path: Path, root: str) -> References:
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ReferenceError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ReferenceError(f"{path}: not a COCO captions file (no 'images' list)")
    if not isinstance(doc.get("annotations"), list):
        raise ReferenceError(f"{path}: not a COCO captions file (no 'annotations' list)")
    uris: dict[Any, str] = {}
    for n, image in enumerate(doc["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ReferenceError(f"{path}: images[{n}] needs 'id' and 'file_name'")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ReferenceError(f"{path}: images[{n}]: file_name must be a non-empty string")
        uris[image["id"]] = image_uri(image["file_name"], root)
    refs: References = {}
    for n, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{n}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ReferenceError(f"{where} needs 'image_id' and 'caption'")
        image_id = ann["image_id"]
        if not isinstance(image_id, int | str) or image_id not in uris:
            raise ReferenceError(f"{where}: image_id {image_id!r} is not in 'images'")
        refs.setdefault(uris[image_id], []).append(_caption(ann["caption"], where))
    return refs


def _read_jsonl(path: Path, root: str) -> References:
    refs: References = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReferenceError(f"{where}: malformed JSON: {exc.msg}") from exc
        if not isinstance(row, dict) or "uri" not in row or "caption" not in row:
            raise ReferenceError(f"{where}: a row needs 'uri' and 'caption'")
        _add_row(refs, row["uri"], row["caption"], root, where)
    return refs


def _read_csv(path: Path, root: str) -> References:
    reader = csv.DictReader(_read_text(path).splitlines())
    header = reader.fieldnames or []
    missing = [col for col in ("uri", "caption") if col not in header]
    if missing:
        have = ", ".join(header) if header else "nothing"
        raise ReferenceError(f"{path}: missing column(s) {', '.join(missing)} (header has {have})")
    refs: References = {}
    try:
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or row["caption"] is None:  # too many or too few fields
                raise ReferenceError(f"{where}: expected the {len(header)} columns of the header")
            _add_row(refs, row["uri"], row["caption"], root, where)
    except csv.Error as exc:
        raise ReferenceError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc
    return refs


def _add_row(refs: References, uri: Any, caption: Any, root: str, where: str) -> None:
    if not isinstance(uri, str) or not uri.strip():
        raise ReferenceError(f"{where}: uri must be a non-empty string, got {uri!r:.60}")
    refs.setdefault(image_uri(uri.strip(), root), []).append(_caption(caption, where))
