"""FrozenVLM on LLaVA-NeXT and Qwen2.5-VL: variable image-token counts, extra processor inputs.

For each family (tiny random configs, CPU, float32): k = 0 is the stock model bit for bit;
k > 0 text logits equal an independent masked reference built from stock modules only (the
model's own image features and position ids, its decoder layers under a 4D mask per layer);
cached generation equals recomputation; a padded batch of different image sizes with one k
per sample equals per-sample runs; k = N never runs the vision tower.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepinsert.errors import InputError, ModelLoadError
from deepinsert.frozen_vlm import IGNORE_INDEX, FrozenVLM
from helpers.tiny import tiny_llava, tiny_llava_next, tiny_qwen2_5_vl

N_LAYERS = 4


class NextFamily:
    """LLaVA-NeXT: ``pixel_values (I, 5, 3, 16, 16)`` tiles + ``image_sizes``; counts from the stock packer."""

    name = "llava_next"
    SIZES = ([16, 32], [30, 20], [32, 32], [16, 16])

    @staticmethod
    def build(seed: int = 0, attn: str = "sdpa"):
        return never_emit_placeholders(tiny_llava_next(seed=seed, attn_implementation=attn))

    @staticmethod
    def tower(model):
        return model.model.vision_tower

    @classmethod
    def image(cls, model, which: int, g: torch.Generator):
        """One image: (pixel_values, extras, its image-token count from the stock model)."""
        pv = torch.randn(1, 5, 3, 16, 16, generator=g)
        sizes = torch.tensor([cls.SIZES[which]])
        with torch.no_grad():
            n = model.model.get_image_features(pixel_values=pv, image_sizes=sizes, return_dict=True).pooler_output[0]
        return pv, {"image_sizes": sizes}, int(n.shape[0])

    @staticmethod
    def wrap(model, n: int) -> list[int]:
        return [model.config.image_token_id] * n

    @staticmethod
    def cat(pvs, extras):
        return torch.cat(pvs), {"image_sizes": torch.cat([e["image_sizes"] for e in extras])}

    @staticmethod
    def layer0(model, ids, mask, pv, extras):
        """Stock embeddings with the image rows scattered in, and positions ``(B, L)``."""
        with torch.no_grad():
            emb = model.model.language_model.embed_tokens(ids)
            f = model.model.get_image_features(pixel_values=pv, image_sizes=extras["image_sizes"],
                                               return_dict=True).pooler_output
            is_img = ids == model.config.image_token_id
            emb = emb.masked_scatter(is_img.unsqueeze(-1), torch.cat(f))
        return emb, (mask.cumsum(1) - 1).clamp(min=0), is_img

    @classmethod
    def stock(cls, model, ids, mask, pv, extras):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, pixel_values=pv,
                         position_ids=(mask.cumsum(1) - 1).clamp(min=0), **extras).logits


class QwenFamily:
    """Qwen2.5-VL: ``pixel_values (patches, 24)`` + ``image_grid_thw``; ``t·h·w / 4`` tokens per image."""

    name = "qwen2_5_vl"
    GRIDS = ([1, 4, 4], [1, 4, 6], [1, 6, 8], [1, 2, 4])

    @staticmethod
    def build(seed: int = 0, attn: str = "sdpa"):
        return never_emit_placeholders(tiny_qwen2_5_vl(seed=seed, attn_implementation=attn))

    @staticmethod
    def tower(model):
        return model.model.visual

    @classmethod
    def image(cls, model, which: int, g: torch.Generator):
        grid = torch.tensor([cls.GRIDS[which]])
        pv = torch.randn(int(grid.prod()), 24, generator=g)
        return pv, {"image_grid_thw": grid}, int(grid.prod()) // 4

    @staticmethod
    def wrap(model, n: int) -> list[int]:
        c = model.config
        return [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]

    @staticmethod
    def cat(pvs, extras):
        return torch.cat(pvs), {"image_grid_thw": torch.cat([e["image_grid_thw"] for e in extras])}

    @staticmethod
    def layer0(model, ids, mask, pv, extras):
        """Stock embeddings with the image rows scattered in, and the 3-D positions ``(3, B, L)``."""
        grid = extras["image_grid_thw"]
        is_img = ids == model.config.image_token_id
        with torch.no_grad():
            emb = model.model.language_model.embed_tokens(ids)
            f = model.model.get_image_features(pixel_values=pv, image_grid_thw=grid, return_dict=True).pooler_output
            emb = emb.masked_scatter(is_img.unsqueeze(-1), torch.cat(f))
            pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=is_img.int(), image_grid_thw=grid,
                                                attention_mask=mask)
        return emb, pos, is_img

    @staticmethod
    def stock(model, ids, mask, pv, extras):
        types = (ids == model.config.image_token_id).int()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, pixel_values=pv, mm_token_type_ids=types,
                         **extras).logits


FAMILIES = [NextFamily, QwenFamily]
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]  # tiny_llava_next's canvases


def never_emit_placeholders(model):
    """Zero the LM-head rows of the image/vision ids (the last 4) so greedy decoding of a
    random model does not emit them (a recomputation would read them as image tokens)."""
    with torch.no_grad():
        model.lm_head.weight[-4:] = 0
    return model


def batch(fam, model, specs, seed: int = 0):
    """Left-padded batch of ``specs = [(before, image index, after), ...]``.

    Returns ids, mask, pixel_values, extras (the processor's names), per-sample image tokens.
    """
    g = torch.Generator().manual_seed(seed)
    rows, pvs, exs, counts = [], [], [], []
    for before, which, after in specs:
        pv, ex, n = fam.image(model, which, g)
        pvs.append(pv)
        exs.append(ex)
        counts.append(n)
        rows.append(torch.cat([torch.tensor([1]), torch.randint(3, 80, (before - 1,), generator=g),
                               torch.tensor(fam.wrap(model, n)), torch.randint(3, 80, (after,), generator=g)]))
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
    pv, extras = fam.cat(pvs, exs)
    return ids, mask, pv, extras, counts


def reference(fam, model, ids, mask, pv, extras, k: int, positions: torch.Tensor | None = None,
              *, reset: bool = True) -> torch.Tensor:
    """Independent late-insertion reference: the full sequence through the stock decoder
    layers; below k a 4D mask isolates the image rows, at k they are reset to layer-0 input
    (``reset=False``: masking mode). ``positions`` overrides the model's own position ids."""
    emb, pos, is_img = fam.layer0(model, ids, mask, pv, extras)
    pos = pos if positions is None else positions
    lm = model.model.language_model
    B, L, _ = emb.shape
    causal = torch.ones(L, L, dtype=torch.bool).tril() & mask.bool().unsqueeze(1)
    eye = torch.eye(L, dtype=torch.bool).expand(B, L, L)
    text = ~is_img
    isolated = (causal & text.unsqueeze(1) & text.unsqueeze(2)) | eye
    together = causal | eye
    minv = torch.finfo(emb.dtype).min
    with torch.no_grad():
        pe = lm.rotary_emb(emb, pos)
        h = emb
        for i, layer in enumerate(lm.layers):
            if i == k and reset:
                h = torch.where(is_img.unsqueeze(-1), emb, h)
            allowed = together if i >= k else isolated
            m4 = torch.where(allowed, 0.0, minv).unsqueeze(1).to(emb.dtype)
            h = layer(h, attention_mask=m4, position_ids=None, position_embeddings=pe)
        return model.lm_head(lm.norm(h))


SPECS = [(3, 0, 6), (5, 1, 4), (2, 2, 7)]


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_k0_is_stock_bit_for_bit(fam, attn: str) -> None:
    model = fam.build(attn=attn)
    ids, mask, pv, extras, _ = batch(fam, model, SPECS[:1])
    out = FrozenVLM(model).forward(ids, pv, insert_layer=0, **extras)
    assert_close(out, fam.stock(model, ids, mask, pv, extras), rtol=0, atol=0)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_k0_padded_batch_of_different_image_sizes_matches_stock(fam) -> None:
    model = fam.build()
    ids, mask, pv, extras, counts = batch(fam, model, SPECS)
    assert len(set(counts)) == 3 and len(set(mask.sum(1).tolist())) > 1  # the batch really is ragged
    out = FrozenVLM(model).forward(ids, pv, mask, **extras)
    real = mask.bool()
    assert_close(out[real], fam.stock(model, ids, mask, pv, extras)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_late_insertion_matches_masked_reference(fam, attn: str, k: int) -> None:
    model = fam.build(attn=attn)
    ids, mask, pv, extras, _ = batch(fam, model, SPECS)
    text = (ids != model.config.image_token_id) & mask.bool()
    out = FrozenVLM(model).forward(ids, pv, mask, insert_layer=k, **extras)
    ref = reference(fam, model, ids, mask, pv, extras, k)
    assert_close(out[text], ref[text], rtol=1e-4, atol=1e-4)
    stock = fam.stock(model, ids, mask, pv, extras)  # and it is not the stock model: the test can fail
    assert (out[text] - stock[text]).abs().max() > 1e-2


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_masking_mode_matches_the_reference_without_reset(fam) -> None:
    model = fam.build()
    ids, mask, pv, extras, _ = batch(fam, model, SPECS)
    text = (ids != model.config.image_token_id) & mask.bool()
    out = FrozenVLM(model).forward(ids, pv, mask, insert_layer=2, mode="mask", **extras)
    ref = reference(fam, model, ids, mask, pv, extras, 2, reset=False)
    assert_close(out[text], ref[text], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_reference_at_k0_is_stock(fam) -> None:
    """Sanity check of the reference itself."""
    model = fam.build()
    ids, mask, pv, extras, _ = batch(fam, model, SPECS)
    real = mask.bool()
    ref = reference(fam, model, ids, mask, pv, extras, 0)
    assert_close(ref[real], fam.stock(model, ids, mask, pv, extras)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_per_sample_k_in_a_padded_batch_equals_per_sample_runs(fam) -> None:
    model = fam.build(seed=1)
    vlm = FrozenVLM(model)
    specs = SPECS + [(4, 3, 3)]
    ks = [2, 0, N_LAYERS, 1]
    ids, mask, pv, extras, _ = batch(fam, model, specs, seed=4)
    out = vlm.forward(ids, pv, mask, insert_layer=torch.tensor(ks), **extras)
    for i in range(len(specs)):  # sample i alone: its real tokens, its image, no padding
        real = mask[i].bool()
        one = ids[i, real][None]
        pv_i, ex_i = image_of(fam, pv, extras, i)
        alone = vlm.forward(one, pv_i, insert_layer=ks[i], **ex_i)
        text = one[0] != model.config.image_token_id
        assert_close(out[i, real][text], alone[0, text], rtol=1e-5, atol=1e-5)


def image_of(fam, pv, extras, i: int):
    """The pixel values and extras of image ``i`` of a batch built by :func:`batch`."""
    if fam is NextFamily:
        return pv[i : i + 1], {"image_sizes": extras["image_sizes"][i : i + 1]}
    grid = extras["image_grid_thw"]
    start = int(grid[:i].prod(-1).sum())
    return pv[start : start + int(grid[i].prod())], {"image_grid_thw": grid[i : i + 1]}


def greedy_without_cache(vlm: FrozenVLM, ids, mask, pv, extras, k, n: int) -> torch.Tensor:
    """Recompute the whole prefix at every step: the independent check of the KV cache."""
    out, cur, m = [], ids, mask
    for _ in range(n):
        nxt = vlm.forward(cur, pv, m, insert_layer=k, **extras)[:, -1].argmax(-1)
        out.append(nxt)
        cur = torch.cat([cur, nxt[:, None]], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("k", [0, 2, N_LAYERS, (3, 0, 1)])
def test_cached_generate_equals_recomputation(fam, k) -> None:
    model = fam.build(seed=2)
    vlm = FrozenVLM(model)
    ids, mask, pv, extras, _ = batch(fam, model, SPECS, seed=5)
    k = list(k) if isinstance(k, tuple) else k
    got = vlm.generate(ids, pv, mask, insert_layer=k, max_new_tokens=6, eos_token_id=[], **extras)
    ref = greedy_without_cache(vlm, ids, mask, pv, extras, k, 6)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_k_equals_n_never_runs_the_vision_tower(fam) -> None:
    model = fam.build()
    ids, mask, pv, extras, _ = batch(fam, model, SPECS)
    calls: list[int] = []
    handle = fam.tower(model).register_forward_hook(lambda *a: calls.append(1))
    vlm = FrozenVLM(model)
    try:
        out = vlm.forward(ids, pv, mask, insert_layer=N_LAYERS, **extras)
        got = vlm.generate(ids, pv, mask, insert_layer=N_LAYERS, max_new_tokens=3, eos_token_id=[], **extras)
        if fam is QwenFamily:  # the 3-D positions need the grids, not the pixels
            no_pixels = vlm.forward(ids, None, mask, insert_layer=N_LAYERS, **extras)
            assert_close(no_pixels, out, rtol=0, atol=0)
        else:
            assert_close(vlm.forward(ids, None, mask, insert_layer=N_LAYERS), out, rtol=0, atol=0)
    finally:
        handle.remove()
    assert calls == []
    assert got.shape == (3, 3)
    text = (ids != model.config.image_token_id) & mask.bool()
    ref = reference(fam, model, ids, mask, pv, extras, N_LAYERS)
    assert_close(out[text], ref[text], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_answer_loss_equals_cross_entropy_of_forward(fam) -> None:
    model = fam.build(seed=3)
    vlm = FrozenVLM(model)
    ids, mask, pv, extras, _ = batch(fam, model, SPECS, seed=6)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -3:] = ids[:, -3:]
    ks = [0, 2, N_LAYERS]
    got = vlm.answer_loss(ids, pv, mask, labels=labels, insert_layers=ks, **extras)
    for j, k in enumerate(ks):
        logits = vlm.forward(ids, pv, mask, insert_layer=k, **extras)
        ce = F.cross_entropy(logits[:, -4:-1].transpose(1, 2), ids[:, -3:], reduction="none").mean(1)
        assert_close(got[:, j], ce, rtol=1e-5, atol=1e-5)


def test_qwen_mm_token_type_ids_default_and_explicit_agree() -> None:
    fam = QwenFamily
    model = fam.build()
    ids, mask, pv, extras, _ = batch(fam, model, SPECS)
    vlm = FrozenVLM(model)
    types = (ids == model.config.image_token_id).int()
    a = vlm.forward(ids, pv, mask, insert_layer=2, **extras)
    b = vlm.forward(ids, pv, mask, insert_layer=2, mm_token_type_ids=types, **extras)
    assert_close(a, b, rtol=0, atol=0)
    # the 3-D positions matter: the reference with 1-D positions gives other text logits
    _, pos, is_img = fam.layer0(model, ids, mask, pv, extras)
    assert (pos[1] != pos[2]).any()  # height and width ids differ inside an image
    one_d = reference(fam, model, ids, mask, pv, extras, 2, positions=(mask.cumsum(1) - 1).clamp(min=0))
    text = (~is_img) & mask.bool()
    assert (a[text] - one_d[text]).abs().max() > 1e-3


def test_family_input_errors() -> None:
    nxt = FrozenVLM(tiny_llava_next())
    ids, _, pv, extras, _ = batch(NextFamily, nxt.model, SPECS[:1])
    with pytest.raises(InputError, match="image_sizes"):
        nxt.forward(ids, pv, insert_layer=1)
    with pytest.raises(InputError, match=r"\(I, P, 3, H, W\)"):
        nxt.forward(ids, pv[:, 0], insert_layer=1, **extras)
    with pytest.raises(InputError, match="image_grid_thw is not an input of LLaVA-NeXT"):
        nxt.forward(ids, pv, image_grid_thw=torch.tensor([[1, 4, 4]]), **extras)
    short = torch.cat([ids[:, :4], ids[:, 8:]], 1)
    with pytest.raises(InputError, match="do not match"):
        nxt.forward(short, pv, insert_layer=1, **extras)
    qwen = FrozenVLM(tiny_qwen2_5_vl())
    ids, _, pv, extras, _ = batch(QwenFamily, qwen.model, SPECS[:1])
    with pytest.raises(InputError, match="image_grid_thw"):
        qwen.forward(ids, pv, insert_layer=1)
    with pytest.raises(InputError, match="patches"):
        qwen.forward(ids, pv[:-4], insert_layer=1, **extras)
    llava = FrozenVLM(tiny_llava())
    with pytest.raises(InputError, match="image_sizes is not an input of LLaVA"):
        llava.forward(torch.tensor([[1, 5]]), None, image_sizes=torch.tensor([[16, 16]]))


def test_unsupported_architecture_names_the_supported_ones() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ModelLoadError, match="LlavaNextForConditionalGeneration.*Qwen2_5_VLForConditionalGeneration"):
        FrozenVLM(llama)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_load_vlm_loads_a_saved_checkpoint_of_the_family(fam, tmp_path) -> None:
    from deepinsert.frozen_vlm import load_vlm

    model = fam.build()
    model.save_pretrained(tmp_path)
    vlm = load_vlm(tmp_path, dtype="float32", device="cpu")
    assert type(vlm.model) is type(model)
    ids, mask, pv, extras, _ = batch(fam, model, SPECS)
    assert_close(vlm.forward(ids, pv, mask, insert_layer=2, **extras),
                 FrozenVLM(model).forward(ids, pv, mask, insert_layer=2, **extras), rtol=0, atol=0)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_collated_batch_of_different_image_sizes_equals_per_sample_losses(fam) -> None:
    """Processor-like single-sample parts (NeXT: different tile counts) collate into one batch
    whose ``image_inputs`` the engine takes as they are."""
    from deepinsert.frozen_vlm import PromptBatch, collate

    model = fam.build(seed=4)
    vlm = FrozenVLM(model)
    parts = []
    for i, spec in enumerate(SPECS):
        ids, mask, pv, extras, _ = batch(fam, model, [spec], seed=10 + i)
        if fam is NextFamily:  # tiles as the processor gives them: their count differs per image
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            pv = pv[:, : image_size_to_num_patches(extras["image_sizes"][0].tolist(), NEXT_PINPOINTS, 16)]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -2:] = ids[:, -2:]
        parts.append(PromptBatch(ids, mask, pv, labels, extras))
    b = collate(parts, pad_id=0)
    if fam is NextFamily:
        assert b.pixel_values.shape[:2] == (3, 5) and len({p.pixel_values.shape[1] for p in parts}) > 1
    got = vlm.answer_loss(b.input_ids, b.pixel_values, b.attention_mask, labels=b.labels, insert_layers=[0, 2],
                          **b.image_inputs)
    for i, p in enumerate(parts):
        alone = vlm.answer_loss(p.input_ids, p.pixel_values, p.attention_mask, labels=p.labels, insert_layers=[0, 2],
                                **p.image_inputs)
        assert_close(got[i], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_running_batch_decodes_like_generate(fam) -> None:
    from deepinsert.frozen_vlm.running import RunningBatch

    model = fam.build(seed=2)
    vlm = FrozenVLM(model)
    ids, mask, pv, extras, _ = batch(fam, model, SPECS, seed=5)
    want = vlm.generate(ids, pv, mask, insert_layer=2, max_new_tokens=4, eos_token_id=[], **extras)
    rb = RunningBatch(vlm)
    nxt = rb.prefill(["a", "b", "c"], ids, mask, pv, 2, **extras).argmax(-1)
    got = [nxt]
    for _ in range(3):
        nxt = rb.step(dict(zip(rb.ids, nxt.tolist()))).argmax(-1)
        got.append(nxt)
    assert torch.equal(torch.stack(got, 1), want)


def test_llava_next_with_a_sliding_window_decoder() -> None:
    """A Mistral window longer than the prompts: the stock model's sliding mask, same logits;
    prompts longer than the window are refused."""
    model = never_emit_placeholders(tiny_llava_next(sliding_window=128))
    ids, mask, pv, extras, _ = batch(NextFamily, model, SPECS)
    vlm = FrozenVLM(model)
    real = mask.bool()
    stock = NextFamily.stock(model, ids, mask, pv, extras)
    assert_close(vlm.forward(ids, pv, mask, **extras)[real], stock[real], rtol=1e-5, atol=1e-5)
    text = (ids != model.config.image_token_id) & real
    ref = reference(NextFamily, model, ids, mask, pv, extras, 2)
    assert_close(vlm.forward(ids, pv, mask, insert_layer=2, **extras)[text], ref[text], rtol=1e-4, atol=1e-4)
    short = FrozenVLM(tiny_llava_next(sliding_window=32))
    with pytest.raises(InputError, match="sliding window"):
        short.forward(ids, pv, mask, insert_layer=2, **extras)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_image_processor_output_is_taken_as_it_is(fam) -> None:
    """Two images of different sizes through the family's own image processor (padded tiles,
    patch grids); its outputs go to the engine unchanged, in a left-padded batch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 40), (30, 30))]
    model = fam.build()
    if fam is NextFamily:
        from transformers import LlavaNextImageProcessor

        proc = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                       image_grid_pinpoints=NEXT_PINPOINTS)
        enc = proc(images, return_tensors="pt")
        extras = {"image_sizes": enc["image_sizes"]}
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=enc["pixel_values"], return_dict=True,
                                                   **extras).pooler_output
        counts = [int(f.shape[0]) for f in feats]
    else:
        from transformers import Qwen2VLImageProcessor

        proc = Qwen2VLImageProcessor(patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=16,
                                     max_pixels=64 * 64)
        enc = proc(images, return_tensors="pt")
        extras = {"image_grid_thw": enc["image_grid_thw"]}
        counts = (enc["image_grid_thw"].prod(-1) // 4).tolist()
    pv = enc["pixel_values"]
    assert len(set(counts)) == 2
    tails = ([7, 8, 9, 10], [7, 8])  # different text lengths too
    rows = [torch.tensor([1, 5, 6, *fam.wrap(model, n), *tail]) for n, tail in zip(counts, tails)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    vlm = FrozenVLM(model)
    real = mask.bool()
    assert_close(vlm.forward(ids, pv, mask, **extras)[real], fam.stock(model, ids, mask, pv, extras)[real],
                 rtol=1e-5, atol=1e-5)
    text = (ids != model.config.image_token_id) & real
    ref = reference(fam, model, ids, mask, pv, extras, 3)
    assert_close(vlm.forward(ids, pv, mask, insert_layer=3, **extras)[text], ref[text], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_image_summary_is_the_mean_of_each_images_stock_features(fam) -> None:
    """The image-aware routing stage's input: per image, the mean of the rows the stock model
    scatters into its layer-0 input (variable token counts per image)."""
    model = fam.build()
    ids, mask, pv, extras, counts = batch(fam, model, [(3, 0, 2), (2, 2, 4), (4, 1, 1)])
    emb, _, is_img = fam.layer0(model, ids, mask, pv, extras)
    want = torch.stack([emb[i][is_img[i]].mean(0) for i in range(len(counts))])
    got = FrozenVLM(model).image_summary(pv, **extras)
    assert got.shape == (len(counts), emb.shape[-1]) and len(set(counts)) > 1
    assert_close(got, want.float(), atol=1e-6, rtol=1e-5)
