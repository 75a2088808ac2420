"""LoRA fine-tuning through the engine's layer loop: identity at init, gradients only in the
adapter, a loss that goes down, peft-format reloads (load_vlm and plain peft), merged vs
unmerged, the run folder (checkpoint + resume), and bundles that refuse the wrong adapter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from deepinsert.errors import ConfigError, InputError
from deepinsert.finetune.config import FinetuneConfig
from deepinsert.finetune.lora import attach_lora, lora_parameters, save_adapter
from deepinsert.finetune.train import answer_loss
from deepinsert.frozen_vlm import FrozenVLM, load_vlm
from helpers.tiny import tiny_llava

pytest.importorskip("peft")

N_IMG = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fixed_batch(model, B: int = 4, seed: int = 0):
    """Left-padded ids ``[bos, t, <image>*16, t, t, answer, answer]`` with per-sample lengths,
    labels on the last two tokens, one 16x16 image per sample."""
    from deepinsert.frozen_vlm import PromptBatch

    g = torch.Generator().manual_seed(seed)
    img, V = model.config.image_token_id, model.config.text_config.vocab_size
    rows = []
    for i in range(B):
        before = torch.randint(3, V - 1, (1 + i % 2,), generator=g)
        after = torch.randint(3, V - 1, (2 + i % 3,), generator=g)
        answer = torch.randint(3, V - 1, (2,), generator=g)
        rows.append((torch.cat([torch.tensor([1]), before, torch.full((N_IMG,), img), after]), answer))
    L = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        seq = torch.cat([p, a])
        ids[i, L - len(seq):], mask[i, L - len(seq):] = seq, 1
        labels[i, L - len(a):] = a
    pv = torch.randn(B, 3, 16, 16, generator=g)
    return PromptBatch(ids, mask, pv, labels)


def lora_vlm(seed: int = 0, *, projector: bool = False):
    vlm = FrozenVLM(tiny_llava(seed=seed))
    torch.manual_seed(seed)
    wrapped = attach_lora(vlm, rank=4, alpha=8.0, targets=TARGETS, projector=projector)
    return vlm, wrapped


def train_steps(vlm, wrapped, batch, k, steps: int, lr: float = 1e-2) -> None:
    params = list(lora_parameters(wrapped).values())
    opt = torch.optim.AdamW(params, lr=lr)
    for _ in range(steps):
        loss, _ = answer_loss(vlm, batch, k)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fresh_lora_is_bit_identical_at_every_k() -> None:
    base = FrozenVLM(tiny_llava(seed=3))
    b = fixed_batch(base.model)
    with torch.no_grad():
        ref = [base.logits(b.input_ids, b.pixel_values, b.attention_mask, k) for k in range(base.num_layers + 1)]
    vlm = FrozenVLM(tiny_llava(seed=3))
    torch.manual_seed(0)
    wrapped = attach_lora(vlm, rank=4, alpha=8.0, targets=TARGETS, projector=True)
    n_lora = sum(1 for n, _ in wrapped.named_modules() if n.endswith(".lora_A"))
    assert n_lora == 7 * vlm.num_layers + 2  # every decoder projection + the projector's two linears
    assert all(not p.detach().any() for n, p in wrapped.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        for k in range(vlm.num_layers + 1):
            assert torch.equal(vlm.logits(b.input_ids, b.pixel_values, b.attention_mask, k), ref[k]), k


def test_vision_tower_is_not_adapted() -> None:
    vlm, wrapped = lora_vlm()
    names = [n for n, _ in wrapped.named_modules() if n.endswith(".lora_A")]
    assert names and all(".language_model.layers." in n for n in names)


def test_gradients_reach_only_the_adapter() -> None:
    vlm, wrapped = lora_vlm(seed=1, projector=True)
    b = fixed_batch(vlm.model)
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" not in n}
    trainable = lora_parameters(wrapped)
    assert trainable and all("lora_" in n for n in trainable)
    train_steps(vlm, wrapped, b, torch.tensor([0, 1, 2, 4]), steps=1)
    for n, p in wrapped.named_parameters():
        if "lora_" in n:  # at B = 0 only B's gradient is non-zero (dL/dA = B^T ...)
            assert p.grad is not None and ("lora_A" in n or float(p.grad.abs().sum()) > 0), n
        else:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n


def test_training_loss_matches_the_engine_and_goes_down() -> None:
    vlm, wrapped = lora_vlm(seed=2)
    b = fixed_batch(vlm.model)
    k = 2
    ks = torch.full((4,), k)
    # the training loss is the engine's answer loss (an independent code path: inference_mode, shared text pass)
    _, per_sample = answer_loss(vlm, b, ks)
    ref = vlm.answer_loss(b.input_ids, b.pixel_values, b.attention_mask, labels=b.labels, insert_layers=[k])[:, 0]
    assert_close(per_sample.detach(), ref, rtol=1e-5, atol=1e-5)
    train_steps(vlm, wrapped, b, ks, steps=25)
    after = vlm.answer_loss(b.input_ids, b.pixel_values, b.attention_mask, labels=b.labels, insert_layers=[k])[:, 0]
    assert float(after.mean()) < 0.5 * float(ref.mean())


def test_distillation_at_k0_with_a_fresh_adapter_is_zero() -> None:
    """KL(base at k = 0 || fresh adapter at k = 0) = 0: the teacher is the model itself."""
    vlm, wrapped = lora_vlm(seed=4)
    b = fixed_batch(vlm.model)

    def teacher(positions):
        with wrapped.disable_adapter():
            return vlm.logits(b.input_ids, b.pixel_values, b.attention_mask, 0, positions=positions)

    loss, _ = answer_loss(vlm, b, torch.zeros(4, dtype=torch.long), teacher=teacher, distill=1.0)
    assert abs(float(loss.detach())) < 1e-6


def test_saved_adapter_reloads_through_load_vlm_and_plain_peft(tmp_path) -> None:
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    tiny_llava(seed=5).save_pretrained(tmp_path / "base")
    vlm, wrapped = lora_vlm(seed=5, projector=True)
    b = fixed_batch(vlm.model)
    train_steps(vlm, wrapped, b, torch.tensor([0, 1, 3, 4]), steps=5)
    wrapped.eval()
    save_adapter(wrapped, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    args = (b.input_ids, b.pixel_values, b.attention_mask)
    with torch.no_grad():
        unmerged = [vlm.logits(*args, k) for k in range(vlm.num_layers + 1)]

    # plain peft on the stock transformers forward (k = 0 only: the stock model has no late insertion)
    plain = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                      tmp_path / "adapter").eval()
    with torch.no_grad():
        stock = plain(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()
    assert_close(stock[real], unmerged[0][real], rtol=1e-5, atol=1e-5)

    # load_vlm merges the adapter: same logits at every k (merged vs unmerged, within float32 rounding)
    merged = load_vlm(tmp_path / "base", adapter=tmp_path / "adapter", dtype="float32", device="cpu")
    base = load_vlm(tmp_path / "base", dtype="float32", device="cpu")
    assert merged.adapter is not None and merged.adapter.startswith("sha256:") and base.adapter is None
    for k in range(vlm.num_layers + 1):
        got = merged.logits(*args, k)
        assert_close(got, unmerged[k], rtol=1e-5, atol=1e-5)
        assert (got - base.logits(*args, k)).abs().max() > 1e-3  # the adapter changes the model


def test_adapter_changes_the_loss_cache_fingerprint(tmp_path) -> None:
    from deepinsert.env.losses import model_fingerprint

    model = tiny_llava(seed=6)
    a = model_fingerprint(FrozenVLM(model))
    assert model_fingerprint(FrozenVLM(model, adapter="sha256:0123456789abcdef")) != a
    assert model_fingerprint(FrozenVLM(model)) == a


def test_bundle_for_another_adapter_is_refused(make_tiny_bundle) -> None:
    from deepinsert.generate import _check_router_fits
    from deepinsert.router import Router

    bundle, tok, weight, _ = make_tiny_bundle(dim=16, model_adapter="sha256:aaaaaaaaaaaaaaaa", n_validation=20)
    router = Router.load(bundle)
    assert router.info.model_adapter == "sha256:aaaaaaaaaaaaaaaa"
    model = tiny_llava(seed=0, num_layers=8, hidden=16, vocab=int(weight.shape[0]))
    _check_router_fits(router, FrozenVLM(model, adapter="sha256:aaaaaaaaaaaaaaaa"))  # fits
    with pytest.raises(InputError, match="adapter sha256:aaaa.*loaded with no adapter"):
        _check_router_fits(router, FrozenVLM(model))
    with pytest.raises(InputError, match="adapter sha256:bbbb"):
        _check_router_fits(router, FrozenVLM(model, adapter="sha256:bbbbbbbbbbbbbbbb"))


def test_config_validation() -> None:
    assert FinetuneConfig(insert_layers=4).insert_layers == [4]
    assert FinetuneConfig(insert_layers="every:2").insert_layers == "every:2"
    for bad in ({"targets": ["fc1"]}, {"rank": 0}, {"precision": "fp16"}, {"distill": 1.5},
                {"insert_layers": [2, 2]}, {"lr": 0}, {"betas": [0.9]}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two 4-step demo fine-tunes: one in one go, one stopped after 2 steps and resumed."""
    from deepinsert.finetune.train import finetune

    cfg = FinetuneConfig(steps=4, batch_size=4, max_train_samples=16, max_val_samples=8, eval_layers=[0, 8],
                         insert_layers=[0, 4], checkpoint_every=2, log_every=1, rank=2, device="cpu",
                         distill=0.5, warmup=1)
    root = tmp_path_factory.mktemp("ft")
    whole = finetune(cfg, root / "whole", progress=False)
    finetune(cfg, root / "resumed", progress=False, evaluate=False, stop_after=2)
    resumed = finetune(cfg, root / "resumed", progress=False, resume=True, evaluate=False)
    return cfg, whole, resumed


def test_demo_run_folder_and_resume(demo_runs) -> None:
    cfg, whole, resumed = demo_runs
    info = json.loads((whole.out / "finetune.json").read_text())
    assert info["adapter"] == whole.adapter and info["steps"] == 4
    assert [h["step"] for h in info["history"]] == [1, 2, 3, 4]
    assert set(info["val"]) == {"adapted", "base"}
    assert (whole.out / "checkpoint" / "state.pt").is_file() and any((whole.out / "tb").iterdir())
    # stopping and resuming replays exactly the same batches and k: bit-identical adapter
    assert resumed.adapter == whole.adapter
    from deepinsert.finetune.train import finetune

    with pytest.raises(InputError, match="--resume"):
        finetune(cfg, whole.out, progress=False)


class _Payload:
    """Unpickling it would call ``_ran.append`` (what a crafted checkpoint could do)."""

    def __reduce__(self):
        return (_ran.append, ("unpickled",))


_ran: list[str] = []


def test_resume_unpickles_nothing(demo_runs, tmp_path) -> None:
    import shutil

    import torch

    from deepinsert.finetune.train import finetune

    cfg, whole, _ = demo_runs
    out = tmp_path / "crafted"
    shutil.copytree(whole.out, out)
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    state["history"].append(_Payload())
    torch.save(state, out / "checkpoint" / "state.pt")
    with pytest.raises(InputError, match="not a readable fine-tuning checkpoint"):
        finetune(cfg, out, progress=False, resume=True, evaluate=False)
    assert _ran == []


def test_cli_finetune_and_its_errors(tmp_path, capsys) -> None:
    import yaml

    from deepinsert.cli import main

    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump({"steps": 2, "batch_size": 2, "max_train_samples": 4, "rank": 2, "device": "cpu",
                                   "insert_layers": [0, 4], "checkpoint_every": 0, "warmup": 0}))
    out = tmp_path / "adapter"
    assert main(["finetune", "--config", str(cfg), "--out", str(out), "--no-eval", "--no-progress"]) == 0
    assert "sha256:" in capsys.readouterr().out
    assert (out / "adapter_config.json").is_file()
    assert main(["finetune", "--config", str(cfg), "--out", str(out), "--no-eval", "--no-progress"]) == 2
    assert "deepinsert finetune: error:" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({"insert_layers": [0, 9], "device": "cpu"}))
    assert main(["finetune", "--config", str(cfg), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "insert_layers" in capsys.readouterr().err


def test_bundle_for_another_architecture_is_refused(make_tiny_bundle) -> None:
    """The bundle records the model class; a router made for another family is refused."""
    from deepinsert.generate import _check_router_fits
    from deepinsert.router import Router

    bundle, tok, weight, _ = make_tiny_bundle(dim=16, model_architecture="Qwen2_5_VLForConditionalGeneration",
                                              n_validation=20)
    router = Router.load(bundle)
    assert router.info.model_architecture == "Qwen2_5_VLForConditionalGeneration"
    model = tiny_llava(seed=0, num_layers=8, hidden=16, vocab=int(weight.shape[0]))
    with pytest.raises(InputError, match="trained for a Qwen2_5_VLForConditionalGeneration.*this model is a "
                                         "LlavaForConditionalGeneration"):
        _check_router_fits(router, FrozenVLM(model))
    same, *_ = make_tiny_bundle(dim=16, model_architecture="LlavaForConditionalGeneration", n_validation=20)
    _check_router_fits(Router.load(same), FrozenVLM(model))  # fits
