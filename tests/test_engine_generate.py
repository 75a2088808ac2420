"""Cached greedy generation, mixed-k padded batches and answer_loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deepinsert.frozen_vlm import FrozenVLM
from helpers.tiny import tiny_llava

N_LAYERS = 4
N_IMG = 16


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3)


@pytest.fixture(scope="module")
def vlm(model):
    return FrozenVLM(model)


def prompt(model, before: int, after: int, seed: int) -> torch.Tensor:
    """``before`` text tokens, the image, ``after`` text tokens (1-D)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([
        torch.randint(3, 90, (before,), generator=g),
        torch.full((N_IMG,), model.config.image_token_id),
        torch.randint(3, 90, (after,), generator=g),
    ])


def left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    return ids, mask


def greedy_without_cache(vlm: FrozenVLM, ids, pv, k: int, n: int) -> torch.Tensor:
    """Recompute the whole prefix at every step: the independent check of the KV cache."""
    out = []
    cur = ids
    for _ in range(n):
        logits = vlm.forward(cur, pv, insert_layer=k)
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        cur = torch.cat([cur, nxt[:, None]], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("k", list(range(N_LAYERS + 1)))
def test_cached_generate_equals_recomputation(model, vlm, k: int) -> None:
    ids = torch.stack([prompt(model, 2, 5, 0), prompt(model, 2, 5, 1)])
    pv = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(k))
    got = vlm.generate(ids, pv, insert_layer=k, max_new_tokens=8, eos_token_id=[])
    ref = greedy_without_cache(vlm, ids, pv, k, 8)
    assert torch.equal(got, ref)


def test_generate_k0_equals_stock_generate(model, vlm) -> None:
    ids = torch.stack([prompt(model, 3, 4, 5), prompt(model, 3, 4, 6)])
    pv = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    got = vlm.generate(ids, pv, max_new_tokens=10, eos_token_id=[])
    stock = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, stock[:, ids.shape[1]:])


def test_generate_stops_at_eos_and_pads(model, vlm) -> None:
    ids = torch.stack([prompt(model, 2, 3, 11)])
    pv = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    free = vlm.generate(ids, pv, max_new_tokens=6, eos_token_id=[])
    eos = int(free[0, 2])
    got = vlm.generate(ids, pv, max_new_tokens=6, eos_token_id=eos)
    first = int((free[0] == eos).nonzero()[0])
    assert got.shape[1] == first + 1  # stops as soon as every sample finished
    assert torch.equal(got[0], free[0, : first + 1])


def mixed_batch(model):
    """Image at the start, middle and end of prompts of different lengths, with mixed k."""
    seqs = [prompt(model, 0, 6, 20), prompt(model, 4, 3, 21), prompt(model, 7, 4, 22), prompt(model, 2, 9, 23)]
    ks = [3, 0, N_LAYERS, 1]
    pv = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    return seqs, ks, pv


def test_padded_mixed_k_forward_equals_per_sample(model, vlm) -> None:
    seqs, ks, pv = mixed_batch(model)
    ids, mask = left_pad(seqs)
    out = vlm.forward(ids, pv, attention_mask=mask, insert_layer=torch.tensor(ks))
    for i, (s, k) in enumerate(zip(seqs, ks)):
        single = vlm.forward(s[None], pv[i : i + 1], insert_layer=k)[0]
        text = s != model.config.image_token_id
        assert_close(out[i, ids.shape[1] - len(s):][text], single[text], rtol=1e-4, atol=1e-4)


def test_padded_mixed_k_generate_equals_per_sample(model, vlm) -> None:
    seqs, ks, pv = mixed_batch(model)
    ids, mask = left_pad(seqs)
    out = vlm.generate(ids, pv, attention_mask=mask, insert_layer=torch.tensor(ks), max_new_tokens=6,
                       eos_token_id=[])
    for i, (s, k) in enumerate(zip(seqs, ks)):
        single = vlm.generate(s[None], pv[i : i + 1], insert_layer=k, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(out[i], single[0]), (i, k)


def labels_for(ids: torch.Tensor, mask: torch.Tensor, n_answer: int) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:, -n_answer:] = ids[:, -n_answer:]
    return labels


def test_answer_loss_list_equals_single_calls_and_forward(model, vlm) -> None:
    seqs, _, pv = mixed_batch(model)
    ids, mask = left_pad(seqs)
    labels = labels_for(ids, mask, 1)
    ks = [0, 1, 2, 3, 4]
    many = vlm.answer_loss(ids, pv, mask, labels=labels, insert_layers=ks)
    assert many.shape == (4, 5) and many.dtype == torch.float32
    for j, k in enumerate(ks):
        one = vlm.answer_loss(ids, pv, mask, labels=labels, insert_layers=k)
        assert_close(many[:, j : j + 1], one, rtol=1e-5, atol=1e-5)
        # independent: cross-entropy from full forward logits
        logits = vlm.forward(ids, pv, mask, insert_layer=k)
        ce = F.cross_entropy(logits[:, -2], ids[:, -1], reduction="none")
        assert_close(many[:, j], ce, rtol=1e-4, atol=1e-4)
    assert (many[:, 0] - many[:, 4]).abs().max() > 1e-3


def test_answer_loss_mean_over_several_tokens(model, vlm) -> None:
    seqs, _, pv = mixed_batch(model)
    ids, mask = left_pad(seqs)
    labels = labels_for(ids, mask, 2)
    got = vlm.answer_loss(ids, pv, mask, labels=labels, insert_layers=[2])
    logits = vlm.forward(ids, pv, mask, insert_layer=2)
    ce = F.cross_entropy(logits[:, -3:-1].reshape(-1, logits.shape[-1]), ids[:, -2:].reshape(-1),
                         reduction="none").view(4, 2).mean(1)
    assert_close(got[:, 0], ce, rtol=1e-4, atol=1e-4)
