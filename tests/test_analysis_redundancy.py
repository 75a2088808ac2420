"""Redundancy: cosine distances and proximal shares against NumPy on a tiny model's hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepinsert.analysis.redundancy import RedundancyAccumulator, collect, cosine_distance, heuristic_layer, proximal_share
from deepinsert.frozen_vlm import FrozenVLM, PromptBatch
from helpers.tiny import tiny_llava
from test_engine_reference import make_inputs

EPS = (0.01, 0.05, 0.3)


def _numpy_profile(model, ids, pv):
    """Stock transformers' hidden states (output_hidden_states) + NumPy distances."""
    with torch.no_grad():
        hs = model(input_ids=ids, pixel_values=pv, output_hidden_states=True).hidden_states
    # the last entry of hidden_states is after the final norm: use the layer outputs 0..N-2 plus
    # the raw last layer from a forward hook
    last = {}
    h = model.model.language_model.layers[-1].register_forward_hook(lambda m, a, o: last.setdefault("h", o))
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pv)
    h.remove()
    states = [s.numpy().astype(np.float64) for s in hs[:-1]] + [last["h"].numpy().astype(np.float64)]
    is_img = (ids == model.config.image_token_id).numpy()
    out = {}
    for name, sel in (("image", is_img), ("text", ~is_img)):
        geo, prox = [], []
        for layer in range(len(states) - 1):
            a, b = states[layer][sel], states[layer + 1][sel]
            d = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            geo.append(d.mean())
            prox.append([(d < e).mean() for e in EPS])
        out[name] = (np.array(geo), np.array(prox))
    return out


def test_profile_equals_numpy_reference() -> None:
    model = tiny_llava()
    ids, pv = make_inputs(model)
    vlm = FrozenVLM(model)
    acc = RedundancyAccumulator(vlm.num_layers, EPS)
    collect(vlm, PromptBatch(ids, torch.ones_like(ids), pv), acc)
    prof = acc.profile()
    ref = _numpy_profile(model, ids, pv)
    for t in ("image", "text"):
        np.testing.assert_allclose(prof[t]["geometric"], ref[t][0], rtol=1e-4, atol=1e-6)
        for j, e in enumerate(EPS):
            np.testing.assert_allclose(prof[t]["proximal"][str(e)], ref[t][1][:, j], atol=1e-12)
    assert prof["image"]["tokens"] == [int((ids == model.config.image_token_id).sum())] * vlm.num_layers


def test_cosine_distance_and_share_closed_form() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]])
    d = cosine_distance(a, b)
    np.testing.assert_allclose(d.numpy(), [0.0, 1.0, 2.0], atol=1e-12)
    assert proximal_share(d, 0.5) == pytest.approx(1 / 3)


def test_heuristic_layer() -> None:
    assert heuristic_layer([0.9, 0.8, 0.3, 0.9], 0.5) == 2
    assert heuristic_layer([None, 0.6, 0.7], 0.5) == 3
    assert heuristic_layer([0.1, 0.9], 0.5) == 0
