"""``deepinsert`` CLI entry for torchrun tests: optionally SIGKILLs one rank mid-shard.

``DEEPINSERT_TEST_KILL_RANK=r`` and ``DEEPINSERT_TEST_KILL_AFTER=n``: rank r kills itself
(SIGKILL, no cleanup) when its loss provider is asked for batch n + 1, on the first attempt
only (``TORCHELASTIC_RESTART_COUNT`` 0), so torchrun's elastic restart runs clean.
"""

from __future__ import annotations

import os
import signal
import sys


def _arm() -> None:
    rank = os.environ.get("DEEPINSERT_TEST_KILL_RANK")
    if rank is None or os.environ.get("RANK") != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    after = int(os.environ.get("DEEPINSERT_TEST_KILL_AFTER", "1"))
    from deepinsert.env.losses import VLMLossProvider

    real = VLMLossProvider.losses
    done = [0]

    def losses(self, samples, ks):  # type: ignore[no-untyped-def]
        if done[0] >= after:
            os.kill(os.getpid(), signal.SIGKILL)
        done[0] += 1
        return real(self, samples, ks)

    VLMLossProvider.losses = losses  # type: ignore[method-assign]


if __name__ == "__main__":
    _arm()
    from deepinsert.cli import main

    sys.exit(main(sys.argv[1:]))
