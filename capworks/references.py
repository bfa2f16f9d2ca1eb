"""Reading reference captions: a COCO captions JSON (`images[{id, file_name}]` and
`annotations[{image_id, caption}]`), or JSONL / CSV rows of `uri,caption` (several rows per image).

Every image is named by the URI capworks stores it under: a local file's absolute path, an
`s3://` URI or an http(s) URL. A relative name is taken under `images_root` (by default the
folder of the references file).

A references file is data from outside too: a name that is an absolute path (`/etc/hostname`,
`file:///...`) or holds a `..` component would make `eval --caption` read a file outside that
root, so such a row is refused, one line each and counted, and the rest are read. With
`allow_outside_root` (`--allow-outside-root`) they are taken as before. Names inside the root are
not resolved through symlinks: `eval --caption` reads them from under the root, where a symlink
is refused like any file root's (`capworks.workers.fileroots`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from capworks.schema.uris import file_uri, is_http, is_s3, local_path

References = dict[str, list[str]]


class ReferenceError(ValueError):
    """A references file that cannot be read: its name, where, and what is wrong, in one line."""


class OutsideRoot(ValueError):
    """A name in a references file that would be read from outside the images root."""


@dataclass(frozen=True)
class RefusedRow:
    """A row (or COCO image) whose name leaves the images root: where it is, the name, why."""

    where: str
    name: str
    reason: str


@dataclass
class ReferenceSet:
    """What a references file holds: captions per image URI, the rows refused, and the local
    folder relative names were taken under (None when the root is s3:// or http(s))."""

    refs: References
    local_root: Path | None
    refused: list[RefusedRow] = field(default_factory=list)


@dataclass(frozen=True)
class _Root:
    """Where relative names go, and whether names may leave it."""

    base: str
    allow_outside: bool


def load_references(path: Path, images_root: str | None = None) -> References:
    """The reference captions of each image (by URI, in file order) from a .json, .jsonl or .csv;
    rows naming a file outside the root are left out (`read_references` lists them)."""
    return read_references(path, images_root).refs


def read_references(
    path: Path, images_root: str | None = None, *, allow_outside_root: bool = False
) -> ReferenceSet:
    """The reference captions of each image from a .json, .jsonl or .csv, and the rows refused
    for naming a file outside the root (absolute, or through `..`) unless `allow_outside_root`."""
    if not path.is_file():
        raise ReferenceError(f"no such references file: {path}")
    base = images_root if images_root is not None else str(path.resolve().parent)
    remote = is_s3(base) or is_http(base)
    if not remote:
        base = str(Path(base).resolve())  # the root's own symlinks are the operator's choice
    root = _Root(base, allow_outside_root)
    refused: list[RefusedRow] = []
    suffix = path.suffix.lower()
    if suffix == ".json":
        refs = _read_coco(path, root, refused)
    elif suffix == ".jsonl":
        refs = _read_jsonl(path, root, refused)
    elif suffix == ".csv":
        refs = _read_csv(path, root, refused)
    else:
        raise ReferenceError(f"{path}: references must be .json (COCO), .jsonl or .csv")
    if not refs:
        why = f" ({len(refused)} rows refused: {refused[0].reason})" if refused else ""
        raise ReferenceError(f"{path}: no reference captions{why}")
    return ReferenceSet(refs, None if remote else Path(base), refused)


def image_uri(name: str, root: str, *, allow_outside: bool = False) -> str:
    """The URI of an image named in a references file: an s3:// or http(s) URI as given, else
    the name under `root`. An absolute path or a `..` component raises `OutsideRoot` unless
    `allow_outside` (then an absolute path is taken as it is, symlinks resolved)."""
    if is_s3(name) or is_http(name):
        return name
    local = local_path(name)
    if local.is_absolute() or name.startswith("file:"):
        if not allow_outside:
            raise OutsideRoot("an absolute path names a file outside the images root")
        return file_uri(local)
    if ".." in PurePosixPath(name).parts:
        if not allow_outside:
            raise OutsideRoot("a `..` component leaves the images root")
    if is_s3(root) or is_http(root):
        return root.rstrip("/") + "/" + name.lstrip("/")
    if allow_outside:
        return file_uri(Path(root) / name)
    return str(Path(root) / name)  # not resolved: a symlink under the root is refused when read


def _uri_or_refusal(name: str, root: _Root, where: str, refused: list[RefusedRow]) -> str | None:
    try:
        return image_uri(name, root.base, allow_outside=root.allow_outside)
    except OutsideRoot as exc:
        refused.append(RefusedRow(where, name, f"{exc} (--allow-outside-root reads it)"))
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV starts with a BOM
    except UnicodeDecodeError as exc:
        raise ReferenceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _caption(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReferenceError(f"{where}: caption must be a non-empty string, got {value!r:.60}")
    return value.strip()


def _read_coco(path: Path, root: _Root, refused: list[RefusedRow]) -> References:
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ReferenceError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ReferenceError(f"{path}: not a COCO captions file (no 'images' list)")
    if not isinstance(doc.get("annotations"), list):
        raise ReferenceError(f"{path}: not a COCO captions file (no 'annotations' list)")
    uris: dict[Any, str | None] = {}
    for n, image in enumerate(doc["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ReferenceError(f"{path}: images[{n}] needs 'id' and 'file_name'")
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ReferenceError(f"{path}: images[{n}]: file_name must be a non-empty string")
        uris[image["id"]] = _uri_or_refusal(
            image["file_name"], root, f"{path}: images[{n}]", refused
        )
    refs: References = {}
    for n, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{n}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ReferenceError(f"{where} needs 'image_id' and 'caption'")
        image_id = ann["image_id"]
        if not isinstance(image_id, int | str) or image_id not in uris:
            raise ReferenceError(f"{where}: image_id {image_id!r} is not in 'images'")
        uri = uris[image_id]
        if uri is not None:  # a refused image's captions go with it
            refs.setdefault(uri, []).append(_caption(ann["caption"], where))
    return refs


def _read_jsonl(path: Path, root: _Root, refused: list[RefusedRow]) -> References:
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
        _add_row(refs, row["uri"], row["caption"], root, where, refused)
    return refs


def _read_csv(path: Path, root: _Root, refused: list[RefusedRow]) -> References:
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
            _add_row(refs, row["uri"], row["caption"], root, where, refused)
    except csv.Error as exc:
        raise ReferenceError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from exc
    return refs


def _add_row(
    refs: References, uri: Any, caption: Any, root: _Root, where: str, refused: list[RefusedRow]
) -> None:
    if not isinstance(uri, str) or not uri.strip():
        raise ReferenceError(f"{where}: uri must be a non-empty string, got {uri!r:.60}")
    text = _caption(caption, where)
    name = _uri_or_refusal(uri.strip(), root, where, refused)
    if name is not None:
        refs.setdefault(name, []).append(text)
