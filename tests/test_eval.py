"""`capworks eval`: our metrics against pycocoevalcap's own evaluation and a CIDEr-D written out
here from the paper, the three reference formats, hypotheses from SQLite and PostgreSQL, a real
`--caption` run of the shapes model against its true captions, and bad inputs."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import png_bytes, require_service, run_cli
from sqlalchemy.orm import Session

from capworks.checkpoints.shapes_world import sample_scenes
from capworks.cli import main
from capworks.evaluation import score_captions, tokenize, tokenize_simple
from capworks.references import ReferenceError, load_references
from capworks.schema.db import connect
from capworks.schema.tables import Caption, Image

# A fixed set: three images with several references each, and one hypothesis each.
REFERENCES = {
    "/data/beach.jpg": [
        "A dog runs along the beach.",
        "A brown dog running on the sand near the sea.",
        "A dog is playing on a sandy beach!",
    ],
    "/data/kitchen.jpg": [
        "A kitchen with a stove, a sink and wooden cabinets.",
        "An empty kitchen with white appliances.",
    ],
    "/data/bus.jpg": [
        "A red double-decker bus on a city street.",
        "A bus driving down the street in London.",
        "The red bus isn't moving (it's parked).",
    ],
    "/data/cat.jpg": ["A cat sleeping on a sofa.", "A grey cat curled up on a couch."],
}
HYPOTHESES = {
    "/data/beach.jpg": "a dog running on the beach",
    "/data/kitchen.jpg": "a kitchen with a stove and a sink",
    "/data/bus.jpg": "a red bus driving down a street",
    "/data/cat.jpg": "a dog lying on a bed",
}


def need_java() -> None:
    """The PTB tokenizer and METEOR are Java programs: skip without one, fail in CI."""
    if shutil.which("java") is None:
        require_service("java", "the PTB tokenizer and METEOR run on Java")


def pycocoevalcap_reference(tmp_path: Path) -> dict[str, float]:
    """The scores as pycocoevalcap computes them from COCO files (COCOEvalCap.evaluate's steps,
    SPICE left out because it downloads Stanford models)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from pycocotools.coco import COCO

    ids = {uri: n for n, uri in enumerate(REFERENCES, start=1)}
    gt = {
        "images": [{"id": i, "file_name": uri} for uri, i in ids.items()],
        "annotations": [
            {"id": len(ids) * 10 + k, "image_id": ids[uri], "caption": c}
            for uri, caps in REFERENCES.items()
            for k, c in enumerate(caps)
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    res = coco.loadRes([{"image_id": ids[u], "caption": c} for u, c in HYPOTHESES.items()])
    gts = {i: coco.imgToAnns[i] for i in coco.getImgIds()}
    hyp = {i: res.imgToAnns[i] for i in coco.getImgIds()}
    tok = PTBTokenizer()
    gts, hyp = tok.tokenize(gts), tok.tokenize(hyp)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, hyp, verbose=0)
    out.update({f"BLEU-{n}": v for n, v in enumerate(bleu, start=1)})
    out["METEOR"], _ = Meteor().compute_score(gts, hyp)
    out["ROUGE-L"], _ = Rouge().compute_score(gts, hyp)
    out["CIDEr-D"], _ = Cider().compute_score(gts, hyp)
    return out


def test_scores_equal_pycocoevalcaps_own_evaluation_on_a_fixed_set(tmp_path: Path) -> None:
    need_java()
    expected = pycocoevalcap_reference(tmp_path)
    ours = score_captions(REFERENCES, HYPOTHESES)
    assert ours.tokenizer == "ptb"
    assert list(ours.metrics) == list(expected)
    for name, value in expected.items():
        assert ours.metrics[name] == pytest.approx(value, abs=1e-9), name
    assert 0 < ours.metrics["CIDEr-D"] < 10 and 0 < ours.metrics["METEOR"] < 1


def ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def cider_d_by_the_paper(refs: dict[str, list[str]], hyps: dict[str, str]) -> dict[str, float]:
    """CIDEr-D of each image as Vedantam et al. define it: tf-idf n-gram vectors (idf over the
    images' reference sets), clipped hypothesis weights, a Gaussian length penalty (sigma 6),
    averaged over n = 1..4 and the references, times 10."""
    grams = {k: [[ngrams(r.split(), n) for n in range(1, 5)] for r in v] for k, v in refs.items()}
    df: Counter[tuple[str, ...]] = Counter()
    for per_ref in grams.values():
        df.update({g for ref in per_ref for by_n in ref for g in by_n})
    log_images = math.log(len(refs))

    def weights(counts: Counter[tuple[str, ...]]) -> dict[tuple[str, ...], float]:
        return {g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in counts.items()}

    out = {}
    for key, hyp in hyps.items():
        total = 0.0
        for ref_text, ref_grams in zip(refs[key], grams[key], strict=True):
            penalty = math.exp(-((len(hyp.split()) - len(ref_text.split())) ** 2) / (2 * 6.0**2))
            for n in range(1, 5):
                h, r = weights(ngrams(hyp.split(), n)), weights(ref_grams[n - 1])
                norm = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(
                    sum(v * v for v in r.values())
                )
                dot = sum(min(h[g], r[g]) * r[g] for g in h if g in r)
                total += penalty * dot / norm / 4 if norm else 0.0
        out[key] = 10 * total / len(refs[key])
    return out


def test_cider_d_and_bleu_1_equal_values_computed_from_their_definitions() -> None:
    ours = score_captions(REFERENCES, HYPOTHESES, tokenizer="simple", meteor=False)
    refs = {k: [tokenize_simple(c) for c in v] for k, v in REFERENCES.items()}
    hyps = {k: tokenize_simple(v) for k, v in HYPOTHESES.items()}
    by_paper = cider_d_by_the_paper(refs, hyps)
    for key, value in by_paper.items():
        assert ours.cider_per_image[key] == pytest.approx(value, rel=1e-9), key
    assert ours.metrics["CIDEr-D"] == pytest.approx(sum(by_paper.values()) / len(by_paper))
    # Corpus BLEU-1: clipped unigram matches over hypothesis words, brevity penalty against
    # the reference length closest to each hypothesis.
    matched = guessed = closest = 0
    for key, hyp in hyps.items():
        words = Counter(hyp.split())
        best = Counter[str]()
        for ref in refs[key]:
            best |= Counter(ref.split())
        matched += sum(min(c, best[w]) for w, c in words.items())
        guessed += len(hyp.split())
        closest += min((abs(len(r.split()) - len(hyp.split())), len(r.split())) for r in refs[key])[
            1
        ]
    bleu_1 = matched / guessed * min(1.0, math.exp(1 - closest / guessed))
    assert ours.metrics["BLEU-1"] == pytest.approx(bleu_1, rel=1e-6)
    assert "METEOR" not in ours.metrics


def shapes_references(count: int, seed: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    refs, truth = {}, {}
    for i, (_, caption) in enumerate(sample_scenes(count, seed)):
        colour = caption.split()[1]
        refs[f"/shapes/{i}.png"] = [caption, f"a {colour} square", caption.replace("a ", "one ", 1)]
        truth[f"/shapes/{i}.png"] = caption
    return refs, truth


def test_perfect_hypotheses_score_cider_d_far_above_shuffled_ones() -> None:
    refs, truth = shapes_references(40, seed=5)
    keys = list(truth)
    shuffled = {k: truth[keys[(n + 7) % len(keys)]] for n, k in enumerate(keys)}
    perfect = score_captions(refs, truth, tokenizer="simple", meteor=False)
    wrong = score_captions(refs, shuffled, tokenizer="simple", meteor=False)
    assert perfect.metrics["CIDEr-D"] > 3 * wrong.metrics["CIDEr-D"]
    assert perfect.metrics["BLEU-4"] > wrong.metrics["BLEU-4"]
    # Images whose shuffled caption happens to be right keep a perfect score.
    assert min(perfect.cider_per_image.values()) > max(
        v for k, v in wrong.cider_per_image.items() if shuffled[k] != truth[k]
    )


def test_simple_tokenizer_gives_the_ptb_tokenizers_words_for_captions() -> None:
    need_java()
    captions = [c for refs in REFERENCES.values() for c in refs] + [
        "Two dogs' toys, on the floor!",
        "A black-and-white photo of a 1,000-year-old tree.",
        '"Stop" sign at 5 p.m. on a U.S. street',
        "a dog can't catch the frisbee; it's too high...",
        "A pizza with toppings: cheese, ham, and olives.",
        "A plate of food/drinks & a kid's toy car, 3.5 inches long",
    ]
    assert [tokenize_simple(c) for c in captions] == tokenize(captions, "ptb")


def write_references(folder: Path, refs: dict[str, list[str]]) -> dict[str, Path]:
    """The same references as COCO JSON (relative file names), JSONL and CSV."""
    names = {uri: Path(uri).name for uri in refs}
    coco = {
        "images": [{"id": n, "file_name": names[u]} for n, u in enumerate(refs)],
        "annotations": [{"image_id": n, "caption": c} for n, u in enumerate(refs) for c in refs[u]],
    }
    paths = {
        "json": folder / "refs.json",
        "jsonl": folder / "refs.jsonl",
        "csv": folder / "refs.csv",
    }
    paths["json"].write_text(json.dumps(coco))
    paths["jsonl"].write_text(
        "".join(json.dumps({"uri": names[u], "caption": c}) + "\n" for u in refs for c in refs[u])
    )
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "caption"])
        writer.writerows((names[u], c) for u in refs for c in refs[u])
    return paths


def test_coco_json_jsonl_and_csv_references_read_alike(tmp_path: Path) -> None:
    paths = write_references(tmp_path, REFERENCES)
    expected = {str(tmp_path / Path(u).name): caps for u, caps in REFERENCES.items()}
    for path in paths.values():
        assert load_references(path) == expected, path.name
    bom = tmp_path / "excel.csv"  # a spreadsheet's CSV export starts with a byte-order mark
    bom.write_text(paths["csv"].read_text(), encoding="utf-8-sig")
    assert load_references(bom) == expected
    under_s3 = load_references(paths["csv"], images_root="s3://bucket/set/")
    assert list(under_s3) == [f"s3://bucket/set/{Path(u).name}" for u in REFERENCES]


def store_captions(db_url: str, captions: dict[str, str], model_id: str, digest: str) -> None:
    """Caption rows as the workers write them, for one model identity."""
    with Session(connect(db_url)) as session:
        for uri, text in captions.items():
            image = session.query(Image).filter_by(uri=uri).one_or_none() or Image(uri=uri)
            session.add(image)
            session.flush()
            session.add(
                Caption(
                    image_id=image.id,
                    model_id=model_id,
                    revision="",
                    settings_hash=digest,
                    settings={},
                    text=text,
                    score=-0.5,
                    alternatives=[],
                    tags={},
                )
            )
        session.commit()


def eval_json(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    """Run `capworks eval` in this process without METEOR (its Java takes ~10 s to start);
    (exit status, parsed stdout, stderr)."""
    code = main(["eval", *args, "--no-progress", "--no-meteor"])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 and "--json" in args else out, err


def test_hypotheses_come_from_the_database_for_one_model_identity(
    any_db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_references(tmp_path, REFERENCES)
    uri = {u: str(tmp_path / Path(u).name) for u in REFERENCES}
    # The kitchen image has no caption by this model; another model and other settings have
    # captions that must not be scored.
    ours = {uri[u]: h for u, h in HYPOTHESES.items() if "kitchen" not in u}
    store_captions(any_db_url, ours, "shapes", "aaaa")
    store_captions(any_db_url, {u: "a cat" for u in uri.values()}, "other-model", "aaaa")
    code, report, err = eval_json(
        str(paths["csv"]), "--db", any_db_url, "--model", "shapes", "--json", capsys=capsys
    )
    assert code == 0, err
    assert report["model"] == {"model_id": "shapes", "revision": "", "settings_hash": "aaaa"}
    assert report["images_scored"] == 3
    assert report["not_scored"] == [
        {"uri": uri["/data/kitchen.jpg"], "reason": "no caption in the database"}
    ]
    direct = score_captions({uri[u]: REFERENCES[u] for u in REFERENCES}, ours, meteor=False)
    assert report["metrics"] == {k: round(v, 6) for k, v in direct.metrics.items()}
    worst = report["worst"][0]
    assert worst["uri"] == uri["/data/cat.jpg"] and worst["caption"] == "a dog lying on a bed"
    assert worst["cider_d"] == round(min(direct.cider_per_image.values()), 6)

    # Captions of a second set of settings: the command asks which, then scores the one named.
    store_captions(any_db_url, {uri["/data/cat.jpg"]: HYPOTHESES["/data/cat.jpg"]}, "shapes", "bb")
    code, _, err = eval_json(
        str(paths["json"]), "--db", any_db_url, "--model", "shapes", capsys=capsys
    )
    assert code == 1 and err.count("\n") == 1 and "aaaa (3 captions)" in err and "bb" in err
    code, report, _ = eval_json(
        str(paths["jsonl"]), "--db", any_db_url, "--model", "shapes", "--settings-hash", "bb",
        "--json", capsys=capsys,
    )  # fmt: skip
    assert code == 0 and report["images_scored"] == 1 and len(report["not_scored"]) == 3


def test_eval_prints_a_table_of_the_metrics_and_the_worst_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_references(tmp_path, REFERENCES)
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    store_captions(
        db_url, {str(tmp_path / Path(u).name): h for u, h in HYPOTHESES.items()}, "m", "aaaa"
    )
    code, out, err = eval_json(
        str(paths["csv"]), "--db", db_url, "--model", "m", "--worst", "2", "--tokenizer", "simple",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "lowest CIDEr-D", "SPICE is not"):
        assert name in out
    assert "4 images scored against 10 reference captions (tokenizer: simple" in out
    assert "METEOR is not computed: --no-meteor" in out
    assert "a dog lying on a bed" in out and "kitchen with a stove and a sink" not in out


def test_without_java_eval_tokenizes_in_python_and_leaves_meteor_out(tmp_path: Path) -> None:
    paths = write_references(tmp_path, REFERENCES)
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    store_captions(
        db_url, {str(tmp_path / Path(u).name): h for u, h in HYPOTHESES.items()}, "m", "aaaa"
    )
    no_java = {"PATH": str(Path(sys.executable).parent)}
    done = run_cli(
        "eval", str(paths["json"]), "--db", db_url, "--model", "m", "--json", env=no_java
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["tokenizer"] == "simple" and "METEOR" not in report["metrics"]
    assert "METEOR is not computed: no java on PATH" in report["notes"]
    asked = run_cli(
        "eval",
        str(paths["json"]),
        "--db",
        db_url,
        "--model",
        "m",
        "--tokenizer",
        "ptb",
        env=no_java,
    )
    assert asked.returncode == 1 and asked.stderr.count("\n") == 1 and "java" in asked.stderr


@pytest.mark.slow
def test_caption_scores_the_shapes_model_against_its_true_captions(
    shapes_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    need_java()
    rows = []
    for i, (img, caption) in enumerate(sample_scenes(40, seed=77)):
        (tmp_path / f"scene{i:02d}.png").write_bytes(png_bytes(img))
        rows.append({"uri": f"scene{i:02d}.png", "caption": caption})
    rows.append({"uri": "missing.png", "caption": "a red square on a blue background"})
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    done = run_cli(
        "eval", str(tmp_path / "refs.jsonl"), "--caption", "--model", "shapes", "--db", db_url,
        "--device", "cpu", "--json", "--worst", "3", "--no-meteor",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["images_scored"] == 40
    assert [m["uri"] for m in report["not_scored"]] == [str(tmp_path / "missing.png")]
    assert report["not_scored"][0]["reason"].startswith("not_found")
    assert report["metrics"]["CIDEr-D"] > 8.0 and report["metrics"]["BLEU-4"] > 0.8
    assert len(report["worst"]) == 3
    # The captions were stored like `capworks caption`'s: scoring them from the database agrees.
    code, again, err = eval_json(
        str(tmp_path / "refs.jsonl"), "--db", db_url, "--model", "shapes", "--json", capsys=capsys
    )
    assert code == 0, err
    assert again["metrics"] == report["metrics"] and again["model"] == report["model"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("refs.json", '{"images": [', "malformed JSON at line 1"),
        ("refs.json", '{"annotations": []}', "no 'images' list"),
        (
            "refs.json",
            '{"images": [{"id": 1, "file_name": "a.png"}],'
            ' "annotations": [{"image_id": 2, "caption": "a cat"}]}',
            "annotations[0]: image_id 2 is not in 'images'",
        ),
        ("refs.csv", "path,text\na.png,a cat\n", "missing column(s) uri, caption"),
        ("refs.csv", "uri,caption\na.png\n", "refs.csv:2: expected the 2 columns"),
        ("refs.jsonl", '{"uri": "a.png", "caption": "a cat"}\n{"uri": "b.png"}\n', "refs.jsonl:2"),
        ("refs.jsonl", '{"uri": "a.png", "caption": "  "}\n', "caption must be a non-empty"),
        ("refs.txt", "a.png a cat\n", "must be .json (COCO), .jsonl or .csv"),
    ],
)
def test_bad_references_get_one_line_and_a_non_zero_exit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ReferenceError, match=re.escape(message)):
        load_references(tmp_path / name)
    code, out, err = eval_json(str(tmp_path / name), "--db", "sqlite://", capsys=capsys)
    assert code == 1 and out == ""
    assert err.startswith("capworks: error: ") and err.count("\n") == 1
    assert message in err


def test_bad_command_lines_and_unknown_models_get_one_line(tmp_path: Path) -> None:
    paths = write_references(tmp_path, REFERENCES)
    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    cases = [
        (("eval", str(tmp_path / "nope.csv"), "--db", db_url), 1, "no such references file"),
        (("eval", str(paths["csv"]), "--db", db_url, "--model", "m"), 1, "no caption by 'm'"),
        (("eval", str(paths["csv"]), "--worst", "0"), 2, "must be at least 1"),
        (("eval", str(paths["csv"]), "--tokenizer", "nltk"), 2, "invalid choice"),
        (("eval",), 2, "required: references"),
    ]
    for args, status, message in cases:
        done = run_cli(*args, env={"CAPWORKS_DATABASE_URL": db_url})
        assert done.returncode == status, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, (args, done.stderr)
        assert done.stdout == ""
