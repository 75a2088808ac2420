"""deepinsert.env.data: both formats, the committed demo splits, and every bad-record error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from deepinsert.demo import SPLITS, demo_data_path
from deepinsert.env.data import VQASample, load_samples
from deepinsert.errors import DataError


def _image(folder: Path, name: str, colour: tuple[int, int, int] = (255, 0, 0)) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(folder / name)


def _llava(rid: str, image: str, question: str, answer: str, **extra: object) -> dict[str, object]:
    return {
        "id": rid,
        "image": image,
        "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
        **extra,
    }


def _write_json(path: Path, records: list[object]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_llava_json_parses_records_and_extra_keys(tmp_path: Path) -> None:
    _image(tmp_path, "imgs/a.png")
    _image(tmp_path, "imgs/b.png", (0, 0, 255))
    path = _write_json(
        tmp_path / "d.json",
        [
            _llava("a", "imgs/a.png", "What color is it?", "red", family="colour", needs_image=True),
            {  # multi-turn: the first human turn and the gpt turn after it; image token after the text
                "id": 7,
                "image": "imgs/b.png",
                "conversations": [
                    {"from": "human", "value": "  What is shown?\n<image>"},
                    {"from": "gpt", "value": " blue "},
                    {"from": "human", "value": "And then?"},
                    {"from": "gpt", "value": "nothing"},
                ],
            },
        ],
    )
    samples = load_samples(path)
    assert samples == [
        VQASample("a", (tmp_path / "imgs/a.png").resolve(), "What color is it?", "red", "colour", True),
        VQASample("7", (tmp_path / "imgs/b.png").resolve(), "What is shown?", "blue", None, None),
    ]
    assert samples.report.format == "llava-json"
    assert (samples.report.n_records, samples.report.n_loaded, samples.report.n_skipped) == (2, 2, 0)
    img = samples[1].load_image()
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (0, 0, 255)


def test_jsonl_parses_and_uses_image_folder(tmp_path: Path) -> None:
    images = tmp_path / "pics"
    _image(images, "x.png")
    lines = [
        json.dumps({"image": "x.png", "question": "<image>\nWhat is 2 plus 2?", "answer": "4"}),
        "",
        json.dumps({"id": "q2", "image": "x.png", "question": "Is it red?", "answer": "yes", "family": "exists"}),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    samples = load_samples(path, images)
    assert [(s.id, s.question, s.answer, s.family) for s in samples] == [
        ("line1", "What is 2 plus 2?", "4", None),
        ("q2", "Is it red?", "yes", "exists"),
    ]
    assert samples.report.format == "jsonl"
    assert samples[0].image_path == (images / "x.png").resolve()


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "r1", "image": "ok.png", "conversations": [{"from": "gpt", "value": "red"}]}, "no human turn"),
        (
            {"id": "r1", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
            "no gpt turn",
        ),
        (_llava("r1", "ok.png", "Q?", "   "), "empty answer"),
        (_llava("r1", "missing.png", "Q?", "a"), "image file not found"),
        (_llava("r1", "corrupt.png", "Q?", "a"), "corrupt image"),
        (_llava("r1", "../outside.png", "Q?", "a"), "escapes the image folder"),
        (_llava("r1", "/etc/passwd", "Q?", "a"), "escapes the image folder"),
        ({"id": "r1", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "a"}]}, "no 'image'"),
    ],
)
def test_bad_llava_record_names_file_and_record(tmp_path: Path, record: dict[str, object], message: str) -> None:
    _image(tmp_path, "ok.png")
    _image(tmp_path.parent, "outside.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    path = _write_json(tmp_path / "d.json", [_llava("good", "ok.png", "Q?", "a"), record])
    with pytest.raises(DataError) as err:
        load_samples(path)
    text = str(err.value)
    assert message in text and str(path) in text and "record 1" in text and "'r1'" in text

    # skip_bad keeps the good record and reports the bad one
    samples = load_samples(path, skip_bad=True)
    assert [s.id for s in samples] == ["good"]
    assert samples.report.n_skipped == 1 and message in samples.report.skipped[0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "ok.png", "question": "Q?", "answer": "a"', "unreadable JSON"),
        ('{"image": "ok.png", "answer": "a"}', "no human turn"),
        ('{"image": "ok.png", "question": "Q?"}', "no gpt turn"),
        ('{"image": "ok.png", "question": "Q?", "answer": ""}', "empty answer"),
        ('{"image": "nope.png", "question": "Q?", "answer": "a"}', "image file not found"),
        ('{"image": "bad.png", "question": "Q?", "answer": "a"}', "corrupt image"),
        ('{"image": "../../x.png", "question": "Q?", "answer": "a"}', "escapes the image folder"),
    ],
)
def test_bad_jsonl_line_names_file_and_line(
    tmp_path: Path, line: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    _image(tmp_path, "ok.png")
    (tmp_path / "bad.png").write_bytes(b"GIF89a garbage")
    good = '{"image": "ok.png", "question": "Q?", "answer": "a"}'
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_samples(path)
    assert message in str(err.value) and f"{path}: line 3" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="deepinsert.env.data"):
        samples = load_samples(path, skip_bad=True)
    assert len(samples) == 3 and samples.report.n_skipped == 1
    assert "skipped 1 of 4 records as bad" in caplog.text


def test_unreadable_json_array_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n {"id": "a",\n  "image": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json: line 3: unreadable JSON"):
        load_samples(path)
    with pytest.raises(DataError, match="cannot read data file"):
        load_samples(tmp_path / "absent.json")
    with pytest.raises(DataError, match="image folder"):
        load_samples(path, tmp_path / "no_such_folder")


def test_load_image_reports_a_file_broken_after_loading(tmp_path: Path) -> None:
    _image(tmp_path, "a.png")
    [sample] = load_samples(_write_json(tmp_path / "d.json", [_llava("a", "a.png", "Q?", "x")]))
    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="cannot read image"):
        sample.load_image()


@pytest.mark.parametrize("split", SPLITS)
def test_committed_demo_splits_load_and_are_balanced(split: str) -> None:
    samples = load_samples(demo_data_path(split), check_images=False)
    assert samples.report.n_skipped == 0
    expected = {"train": 1200, "val": 304, "test": 800, "test_unseen": 800}[split]
    assert len(samples) == expected
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.family or ""] = counts.get(s.family or "", 0) + 1
        assert s.needs_image is (s.family in {"colour", "count", "exists", "position", "digit"})
        assert s.image_path.is_file()
    assert sorted(counts) == sorted(["colour", "count", "exists", "position", "digit", "arith", "weekday", "repeat"])
    assert max(counts.values()) - min(counts.values()) <= 1
