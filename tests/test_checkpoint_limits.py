"""A checkpoint's `config.json` and `configuration.json` are checked before anything loads
(schema/checkpoint_limits.py): `resnet_model_path` is refused wherever it points, and the sizes,
resolution and beam-search numbers are bounded, each with one clear line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from capworks.schema.checkpoint import read_config, resolve_identity
from capworks.schema.errors import CheckpointError

# What save_pretrained writes for a small OFA (the keys this check reads, and the null path).
ARCHITECTURE: dict[str, Any] = {
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 512,
    "decoder_ffn_dim": 512,
    "vocab_size": 59457,
    "max_position_embeddings": 1024,
    "resnet_model_path": None,
    "resnet_type": "resnet50",
}
BEAM: dict[str, Any] = {"beam_size": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}


def checkpoint(
    folder: Path, architecture: dict[str, Any] | None = None, model: dict[str, Any] | None = None
) -> Path:
    """A checkpoint folder in the hub's layout (the weights file is a placeholder: nothing here
    loads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**ARCHITECTURE, **(architecture or {})}))
    section = {"patch_image_size": 64, "max_src_length": 256, "beam_search": dict(BEAM)}
    section.update(model or {})
    (folder / "configuration.json").write_text(json.dumps({"task": "x", "model": section}))
    for name in ("pytorch_model.bin", "vocab.json", "merges.txt"):
        (folder / name).write_bytes(b"placeholder")
    return folder


def test_a_checkpoint_within_bounds_reads_as_before(tmp_path: Path) -> None:
    config = read_config(checkpoint(tmp_path / "ok", {"resnet_model_path": ""}), "m")
    assert (config.patch_image_size, config.generation.beam_size) == (64, 5)
    # Values are checked, never rewritten: the settings hash stays what it was.
    assert (
        config.generation.digest()
        == read_config(checkpoint(tmp_path / "again"), "m").generation.digest()
    )


@pytest.mark.parametrize(
    "target",
    ["/etc/hostname", "../outside/resnet.pt", "resnet50.pt"],
    ids=["absolute", "dot-dot", "inside-the-folder"],
)
def test_resnet_model_path_is_refused_wherever_it_points(tmp_path: Path, target: str) -> None:
    folder = checkpoint(tmp_path / "ckpt", {"resnet_model_path": target})
    (folder / "resnet50.pt").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="resnet_model_path is refused") as refused:
        read_config(folder, "m")
    assert "\n" not in str(refused.value) and target in str(refused.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"patch_image_size": 100_000}, "model.patch_image_size must be a whole number from 16"),
        ({"patch_image_size": "480"}, "model.patch_image_size must be a whole number"),
        ({"max_src_length": 0}, "model.max_src_length must be a whole number from 1"),
        ({"beam_search": {"beam_size": 10_000}}, "beam_search.beam_size must be a whole number"),
        ({"beam_search": {"beam_size": True}}, "beam_search.beam_size must be a whole number"),
        ({"beam_search": {"max_len_b": 10**9}}, "beam_search.max_len_b must be a whole number"),
        ({"beam_search": {"max_len_a": 1e9}}, "beam_search.max_len_a must be a number from 0"),
        ({"beam_search": {"temperature": 0}}, "beam_search.temperature must be a number"),
        ({"beam_search": {"len_penalty": float("nan")}}, "beam_search.len_penalty must be"),
        ({"beam_search": {"normalize_scores": "yes"}}, "normalize_scores must be true or false"),
        ({"beam_search": {"min_len": 20}}, "min_len is above max_len_b"),
        ({"beam_search": []}, "model.beam_search must be an object"),
        ({"num_return_sequences": 6}, "num_return_sequences is above the beam size"),
        ({"prompt": "x" * 5000}, "model.prompt must be text of at most 2048"),
    ],
)
def test_configuration_numbers_out_of_bounds_are_refused_in_one_line(
    tmp_path: Path, model: dict[str, Any], message: str
) -> None:
    folder = checkpoint(tmp_path / "ckpt", model=model)
    with pytest.raises(CheckpointError) as refused:
        read_config(folder, "m")
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert str(folder / "configuration.json") in str(refused.value)
    with pytest.raises(CheckpointError, match="configuration.json"):  # a producer checks too
        resolve_identity(str(folder), None, tmp_path / "cache")


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ({"d_model": 10**7}, "d_model must be a whole number from 8 to 8,192"),
        ({"encoder_layers": 1000}, "encoder_layers must be a whole number from 1 to 64"),
        ({"vocab_size": 10**9}, "vocab_size must be a whole number"),
        ({"decoder_ffn_dim": -1}, "decoder_ffn_dim must be a whole number"),
    ],
)
def test_architecture_sizes_out_of_bounds_are_refused(
    tmp_path: Path, architecture: dict[str, Any], message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        read_config(checkpoint(tmp_path / "ckpt", architecture), "m")


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: not a JSON object"):
        read_config(folder, "m")


def test_the_cli_names_the_refused_key_in_one_line_and_loads_nothing(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "ckpt", {"resnet_model_path": str(tmp_path / "evil.pt")})
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    done = run_cli(
        "caption", str(image), "--model", str(folder), "--db", f"sqlite:///{tmp_path / 'c.db'}",
        "--no-progress",
    )  # fmt: skip
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "resnet_model_path is refused" in done.stderr
    assert "Traceback" not in done.stderr
