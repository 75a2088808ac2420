"""The demo builder: quick build end to end through the CLI, atomic output, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepinsert.cli import main
from deepinsert.demo import demo_data_path
from deepinsert.demo import build as build_mod
from deepinsert.demo.build import build_demo, read_build_info
from deepinsert.demo.scenes import DIGIT_POOL_SIZES, digit_pool
from deepinsert.demo.splits import SPLIT_SPECS, generate_split, llava_record
from deepinsert.demo.train import DemoTrainConfig
from deepinsert.frozen_vlm import PROMPT_TEMPLATE, load_vlm

# late_*_p > 0 also exercises the late-insertion training path
TINY = DemoTrainConfig(vision_steps=2, lm_steps=2, batch_size=4, warmup=1, progress=False, late_text_p=0.5, late_image_p=0.5)


def test_quick_build_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "build", "--quick", "--out", str(out), "--no-progress"]) == 0
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md"):
        assert (model_dir / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == ["data", "model"]  # no temporary leftovers
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "images", "test.json", "test_unseen.json", "train.json", "val.json",
    ]  # fmt: skip
    info = read_build_info(model_dir)
    assert info["quick"] is True and info["test_accuracy_k0"]["counts"]["digit"] == 2

    vlm = load_vlm(str(model_dir), dtype="float32", device="cpu")
    assert vlm.num_layers == 8
    enc = vlm.processor(
        text=[PROMPT_TEMPLATE.format(question="What digit is shown?")], images=[_blank()], return_tensors="pt"
    )
    assert int((enc["input_ids"] == vlm.image_token_id).sum()) == 16
    with torch.no_grad():
        logits = vlm.forward(enc["input_ids"], enc["pixel_values"], enc["attention_mask"])
    assert logits.shape[-1] == len(vlm.tokenizer) and torch.isfinite(logits).all()

    # re-measure by insertion layer and record it in the card
    args = ["demo", "evaluate", "--model", str(model_dir), "--data", str(out / "data" / "test.json")]
    assert main([*args, "--layers", "0", "8", "--update-card"]) == 0
    info = read_build_info(model_dir)
    assert info["test_accuracy_by_k"]["layers"] == [0, 8] and info["test_accuracy_by_k"]["match"] == "exact"
    assert info["test_accuracy_by_k_answer"]["match"] == "answer"
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "| family | n | k=0 | k=8 |" in card


def test_build_never_replaces_the_installed_demo(capsys: pytest.CaptureFixture[str]) -> None:
    from deepinsert.demo import demo_model_path

    before = (demo_model_path() / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "build", "--quick", "--out", str(demo_model_path().parent)]) == 2
    assert "installed demo" in capsys.readouterr().err
    assert (demo_model_path() / "model.safetensors").stat().st_mtime_ns == before


def test_build_is_deterministic_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_demo(a, cfg=TINY)
    build_demo(b, cfg=TINY)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()

    before = (a / "model.safetensors").read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build_mod, "train_lm", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_demo(a, cfg=DemoTrainConfig(seed=1, vision_steps=1, lm_steps=1, batch_size=2, progress=False))
    assert (a / "model.safetensors").read_bytes() == before  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_committed_test_split_is_the_generators_output() -> None:
    spec = next(s for s in SPLIT_SPECS if s.name == "test")
    records = json.loads(demo_data_path("test").read_text(encoding="utf-8"))
    generated = generate_split(spec)
    assert len(records) == len(generated) == spec.size
    for i, (rec, s) in enumerate(zip(records, generated, strict=True)):
        sid = f"test-{i:05d}"
        assert rec == llava_record(sid, f"images/{sid}.png", s)
    # and the images: spot-check a few pixels-exact
    from PIL import Image

    for i in (0, 1, 2, 3, 799):
        with Image.open(demo_data_path("test").parent / records[i]["image"]) as im:
            assert im.convert("RGB").tobytes() == generated[i].rendered.image.tobytes()


def test_digit_pools_are_disjoint() -> None:
    pools = {name: set(digit_pool(name).tolist()) for name in DIGIT_POOL_SIZES}
    assert {k: len(v) for k, v in pools.items()} == DIGIT_POOL_SIZES
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["val"] and not pools["val"] & pools["test"]
    assert set().union(*pools.values()) == set(range(1797))


def test_training_prompts_are_the_engines_prompts() -> None:
    from transformers import AutoProcessor

    from deepinsert.demo import demo_model_path
    from deepinsert.demo.batches import PromptEncoder
    from deepinsert.frozen_vlm import build_batch

    processor = AutoProcessor.from_pretrained(str(demo_model_path()))
    questions = ["What shade is the circle?", "Repeat the word apple.", "What is 3 + 4?"]
    batch = build_batch(processor, [_blank()] * len(questions), questions)
    enc = PromptEncoder(processor)
    for i, q in enumerate(questions):
        assert batch.input_ids[i][batch.attention_mask[i].bool()].tolist() == enc.prompt_ids(q, _blank()), q


def _blank():  # type: ignore[no-untyped-def]
    from PIL import Image

    return Image.new("RGB", (32, 32), (0, 0, 0))


def test_late_training_loss_at_k0_equals_the_stock_loss() -> None:
    """The late-insertion training forward is the stock LLaVA loss when every k is 0."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from deepinsert.demo import demo_model_path
    from deepinsert.demo.batches import PromptEncoder
    from deepinsert.demo.train import _LateForward, _sample_layers, lm_samples

    model = LlavaForConditionalGeneration.from_pretrained(demo_model_path())
    processor = AutoProcessor.from_pretrained(demo_model_path())
    enc = PromptEncoder(processor)
    samples = lm_samples(7, 0, 12)
    right = enc.batch(samples)
    with torch.no_grad():
        ref = model(
            input_ids=right.input_ids,
            attention_mask=right.attention_mask,
            pixel_values=right.pixel_values,
            labels=right.labels,
        ).loss
        late = _LateForward(model, processor)
        left = enc.batch(samples, left_pad=True)
        got = late.loss(left, torch.zeros(len(samples), dtype=torch.long))
        at_n = late.loss(left, torch.full((len(samples),), 8))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert float(at_n) > float(ref) + 0.1  # without the image the answers get harder
    assert model.training and all(p.requires_grad for p in model.parameters())
    cfg = DemoTrainConfig(late_text_p=1.0, late_image_p=0.0)
    ks = _sample_layers(samples, cfg, 8, 0)
    assert all((int(k) > 0) == (not s.needs_image) for k, s in zip(ks, samples))
    assert torch.equal(ks, _sample_layers(samples, cfg, 8, 0))


def test_demo_cli_module_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, deepinsert.demo, deepinsert.cli; print('torch' in sys.modules or 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_demo_data_cli_writes_a_fresh_split_deterministically(tmp_path: Path) -> None:
    """``deepinsert demo data``: the generator's records (the committed split's own rule), balanced
    families, same seed -> same bytes, another seed -> other samples; the loader reads it."""
    from collections import Counter

    from deepinsert.demo.splits import SplitSpec
    from deepinsert.env.data import load_samples

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 201), (b, 201), (c, 202)):
        assert main(["demo", "data", "--out", str(out), "--size", "24", "--seed", str(seed), "--split", "val"]) == 0
    records = json.loads((a / "val.json").read_text(encoding="utf-8"))
    generated = generate_split(SplitSpec("val", 24, 201))
    assert records == [llava_record(f"val-{i:05d}", f"images/val-{i:05d}.png", s) for i, s in enumerate(generated)]
    assert (a / "val.json").read_bytes() == (b / "val.json").read_bytes()
    assert all((a / r["image"]).read_bytes() == (b / r["image"]).read_bytes() for r in records)
    assert (a / "val.json").read_bytes() != (c / "val.json").read_bytes()
    counts = Counter(r["family"] for r in records)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 8
    samples = load_samples(a / "val.json")
    assert len(samples) == 24 and samples[0].load_image().size == generated[0].rendered.image.size


@pytest.mark.parametrize("argv, words", [
    (["--size", "0"], "size"), (["--seed", "-1"], "seed"), (["--split", "test_unseen"], "digits"),
    (["--wording", "poetic"], "wording"),
])
def test_demo_data_cli_refuses_bad_input(argv: list[str], words: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--out": str(tmp_path / "x"), "--seed": "3", "--size": "2"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    assert main(["demo", "data", *[t for kv in base.items() for t in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_demo_data_cli_never_writes_into_the_installed_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "data", "--out", str(demo_data_path("train").parent), "--seed", "3", "--size", "2"]) == 2
    assert "installed demo" in capsys.readouterr().err


@pytest.mark.parametrize("out, words", [("", "empty"), ("{tmp}/file.txt", "existing file")])
def test_demo_data_cli_refuses_an_unusable_out(out: str, words: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file.txt").write_text("x")
    assert main(["demo", "data", "--out", out.format(tmp=tmp_path), "--seed", "3", "--size", "2"]) == 2
    assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
