"""The engine pieces the chat server runs on: sampling math, seeded generate, and the running batch.

References: a NumPy nucleus sampler with the same uniform draws; FrozenVLM.forward on the
whole sequence (prompt + fed tokens) for every logit a RunningBatch returns while rows
join and leave at different insertion layers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from deepinsert.errors import InputError
from deepinsert.frozen_vlm import FrozenVLM
from deepinsert.frozen_vlm.running import RunningBatch
from deepinsert.frozen_vlm.sampling import SamplingParams, find_stop, nucleus_probs, pick_tokens, sample_row
from helpers.tiny import tiny_llava

N_IMG = 16


def _np_nucleus(logits: np.ndarray, t: float, p: float, u: float) -> int:
    z = logits.astype(np.float64) / t
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    cum, kept = 0.0, []
    for i in order:
        kept.append(i)
        cum += probs[i]
        if cum >= p - 1e-6:
            break
    mass = np.array([probs[i] for i in kept])
    c = np.cumsum(mass / mass.sum())
    return kept[min(int(np.searchsorted(c, u, side="right")), len(kept) - 1)]


@pytest.mark.parametrize("t, p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5), (0.3, 0.2)])
def test_sampling_equals_numpy_inverse_cdf(t, p):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        logits = torch.randn(50, generator=g) * 3
        gen = torch.Generator().manual_seed(trial)
        u = float(torch.rand((), generator=torch.Generator().manual_seed(trial)))
        got = sample_row(logits, SamplingParams(t, p, trial), gen)
        assert got == _np_nucleus(logits.numpy(), t, p, u)


def test_nucleus_keeps_the_smallest_mass_reaching_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    ids, probs = nucleus_probs(logits, 1.0, 0.75)
    assert ids.tolist() == [0, 1]
    assert_close(probs, torch.tensor([0.625, 0.375]))
    ids, _ = nucleus_probs(logits, 1.0, 1e-9)
    assert ids.tolist() == [0]


def test_greedy_is_argmax_and_params_validate():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams()
    assert pick_tokens(logits, [greedy] * 3, [None] * 3).tolist() == logits.argmax(-1).tolist()
    for bad in [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"seed": 1.5}, {"temperature": True}]:
        with pytest.raises(InputError):
            SamplingParams(**bad)
    assert find_stop("a cat sat", ["sat", "cat"]) == 2 and find_stop("abc", ["x"]) is None


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=5)


@pytest.fixture(scope="module")
def vlm(model):
    return FrozenVLM(model)


def _prompt(model, before: int, after: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(3, 90, (before,), generator=g), torch.full((N_IMG,), model.config.image_token_id),
                      torch.randint(3, 90, (after,), generator=g)])


def _pad(seqs):
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = s
        mask[i, L - len(s):] = 1
    return ids, mask


def test_seeded_generate_is_reproducible_and_greedy_by_default(model, vlm):
    ids, mask = _pad([_prompt(model, 3, 5, 0), _prompt(model, 2, 7, 1)])
    pv = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = vlm.generate(ids, pv, mask, insert_layer=2, max_new_tokens=8, eos_token_id=[], temperature=1.3, top_p=0.9, seed=3)
    b = vlm.generate(ids, pv, mask, insert_layer=2, max_new_tokens=8, eos_token_id=[], temperature=1.3, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    greedy = vlm.generate(ids, pv, mask, insert_layer=2, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(greedy, vlm.generate(ids, pv, mask, insert_layer=2, max_new_tokens=8, eos_token_id=[],
                                            temperature=0.0, seed=3))
    # greedy's first token is the argmax of the forward logits
    assert greedy[:, 0].tolist() == vlm.forward(ids, pv, mask, insert_layer=2)[:, -1].argmax(-1).tolist()


def test_running_batch_rows_join_and_leave_and_match_forward(model, vlm):
    """Groups at k = 0, 2, 4 (N), one mixed, join at different steps; every logit equals the full-sequence forward."""
    N = vlm.num_layers
    prompts = {i: _prompt(model, 2 + i % 3, 3 + (2 * i) % 5, 10 + i) for i in range(6)}
    ks = {0: 0, 1: 0, 2: 2, 3: N, 4: 2, 5: N}
    pixels = {i: torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    feed = {i: torch.randint(3, 90, (8,), generator=torch.Generator().manual_seed(100 + i)).tolist() for i in range(6)}
    stop_after = {0: 3, 1: 6, 2: 2, 3: 5, 4: 4, 5: 3}
    rb = RunningBatch(vlm)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(6)}
    fed = {i: 0 for i in range(6)}

    def join(group):
        ids, mask = _pad([prompts[i] for i in group])
        layers = [ks[i] for i in group]
        pv = None if set(layers) == {N} else torch.cat([pixels[i] for i in group])
        k = layers[0] if len(set(layers)) == 1 else layers
        for i, row in zip(group, rb.prefill(group, ids, mask, pv, k)):
            got[i].append(row)

    def step():
        logits = rb.step({i: feed[i][fed[i]] for i in rb.ids})
        for i, row in zip(list(rb.ids), logits):
            fed[i] += 1
            got[i].append(row)
            if fed[i] >= stop_after[i]:
                rb.remove(i)

    join([0, 1])  # one k
    step()
    join([2, 3])  # mixed k in one prefill (2 and N)
    step()
    join([5])  # k = N: no image at all
    join([4])
    while len(rb):
        step()
    assert rb.kv_bytes() == 0
    for i in range(6):
        assert len(got[i]) == stop_after[i] + 1
        for t, row in enumerate(got[i]):
            seq = torch.cat([prompts[i], torch.tensor(feed[i][:t], dtype=torch.long)]).unsqueeze(0)
            pv = None if ks[i] == N else pixels[i]
            want = vlm.forward(seq, pv, insert_layer=ks[i])[0, -1]
            assert_close(row, want, atol=2e-5, rtol=1e-4)


def test_running_batch_kv_bytes_count_text_below_k_and_image_above(model, vlm):
    rb = RunningBatch(vlm)
    p = _prompt(model, 3, 4, 0)
    ids, mask = _pad([p])
    rb.prefill(["a"], ids, mask, torch.randn(1, 3, 16, 16), 2)
    tc = model.config.text_config
    per = 2 * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 4
    n_text, N = len(p) - N_IMG, vlm.num_layers
    assert rb.kv_bytes() == per * (2 * n_text + (N - 2) * len(p))
    rb.step({"a": 5})
    assert rb.kv_bytes() == per * (2 * n_text + (N - 2) * len(p) + N)
    with pytest.raises(InputError):
        rb.prefill(["a"], ids, mask, torch.randn(1, 3, 16, 16), 2)


def test_prefill_plan_is_the_cheapest_split(vlm):
    """The scheduler's DP split of a round into prefill calls vs brute force over every split."""
    import itertools

    from deepinsert.serving.scheduler import Job, PrefillCost, Scheduler, SchedulerConfig

    sched = Scheduler(vlm, builder=None, config=SchedulerConfig(), eos_token_ids=[])
    rng = np.random.default_rng(0)
    jobs = [Job(prompt_ids=[], image=object(), layer=int(k), n_text=int(t), n_image=N_IMG, max_tokens=4,
                sampling=SamplingParams(), stops=[])
            for k, t in zip(rng.integers(0, 5, 7), rng.integers(5, 40, 7))]

    def cost(groups, c0, c1):
        return sum(c0 + c1 * sum(sched._flops(j, g[0].layer) for j in g) for g in groups)

    for c0, c1 in [(1.0, 0.0), (0.0, 1.0), (1e-3, 1e-9), (5e-3, 2e-10)]:
        sched._cost = PrefillCost(c0, c1)
        plan = sched.plan_prefills(list(jobs))
        assert sorted(j.layer for g in plan for j in g) == sorted(j.layer for j in jobs)
        order = sorted(jobs, key=lambda j: j.layer)
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], c0, c1)
                   for r in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), r))
        assert cost(plan, c0, c1) == pytest.approx(best, rel=1e-12)
    sched._cost = PrefillCost(1.0, 0.0)
    assert len(sched.plan_prefills(list(jobs))) == 1  # overhead only: one call
    sched._cost = PrefillCost(0.0, 1.0)
    assert all(len({j.layer for j in g}) == 1 for g in sched.plan_prefills(list(jobs)))  # compute only: by k
