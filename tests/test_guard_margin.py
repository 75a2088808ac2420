"""The decision rule of prompts that trip the guard (``guard_margin``): closed form against a
loop, validation of the config and bundle fields."""

from __future__ import annotations

import numpy as np
import pytest


def _by_hand(curve, ks, lam, N, fb, gm, share=1.0):
    """One tripped row: the best predicted reward's layer if it beats the fallback's by > gm and at
    least half of the prompt's tokens are ones the training questions used."""
    r = [-float(curve[j]) + lam * k / N for j, k in enumerate(ks)]
    best = max(range(len(ks)), key=lambda j: (r[j], -j))  # first index on ties
    return best if gm is not None and share >= 0.5 and r[best] - r[fb] > gm else fb


@pytest.mark.parametrize("gm", [None, 0.0, 0.05, 0.3])
def test_guarded_decide_matches_a_loop(gm):
    from deepinsert.utils.decision import decide, guarded_decide

    rng = np.random.default_rng(0)
    ks, N = [0, 2, 4, 6, 8], 8
    pred = np.cumsum(rng.exponential(0.05, size=(400, 5)), axis=1)  # non-decreasing curves
    pred[::7] = pred[::7, :1]  # some flat ones (text-only questions)
    trips = rng.random(400) < 0.4
    share = rng.choice([0.0, 0.3, 0.5, 0.8, 1.0], size=400)
    for lam in (0.0, 0.05, 0.1, 0.5, 3.0):
        for fb in (0, 2):
            for sh in (None, share):
                got = guarded_decide(pred, ks, lam, N, margin=0.02, safe_index=0, trips=trips, fallback_index=fb,
                                     guard_margin=gm, seen_share=sh)
                free = decide(pred, ks, lam, N, margin=0.02, safe_index=0)
                for i in range(len(pred)):
                    s = 1.0 if sh is None else sh[i]
                    want = _by_hand(pred[i], ks, lam, N, fb, gm, s) if trips[i] else int(free[i])
                    assert got[i] == want, (lam, fb, i)
    # with the fallback at the lowest layer and a non-decreasing curve nothing moves at λ <= gm
    if gm:
        a = guarded_decide(pred, ks, 0.999 * gm, N, margin=0.0, safe_index=0, trips=np.ones(400, bool), fallback_index=0,
                           guard_margin=gm)
        assert (a == 0).all()


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_guard_margin_is_refused(bad):
    from deepinsert.errors import BundleError, ConfigError
    from deepinsert.policy.config import TrainConfig
    from deepinsert.utils.decision import check_guard_margin

    with pytest.raises(ConfigError, match="guard_margin"):
        TrainConfig(guard_margin=bad)
    with pytest.raises(BundleError, match="guard.margin"):
        check_guard_margin(bad, BundleError, "router.json: guard.margin")
    assert TrainConfig(guard_margin=0.05).guard_margin == 0.05 and TrainConfig().guard_margin is None


def test_bundle_seen_ids_are_checked():
    from deepinsert.errors import BundleError
    from deepinsert.router.bundle import OBSERVATION_KIND, ObservationSpec

    def spec(ids, n=3):
        return ObservationSpec(kind=OBSERVATION_KIND, max_tokens=8, dim=4, vocab_size=10, tokens="seen",
                               seen_tokens=n, seen_ids=ids)

    assert spec([1, 4, 9]).seen_ids == (1, 4, 9)
    for bad in ([1, 4], [4, 1, 9], [1, 1, 9], [1, 4, 10], [1, 4, True], "149"):
        with pytest.raises(BundleError, match="seen_ids"):
            spec(bad)
