"""``python -m peftkit.search.launch ARGS``: run ``peftkit ARGS`` in this process, set to die with the search.

On Linux the kernel sends SIGKILL to this process when the search process that started it dies (prctl
PR_SET_PDEATHSIG, which survives exec), so that killing a search never leaves its trials training on as orphans.
Elsewhere this is a plain ``python -m peftkit.cli ARGS``.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        parent = os.environ.get("PEFTKIT_SEARCH_PARENT", "")
        if parent.isdigit() and os.getppid() != int(parent):  # the search died before prctl took effect
            os._exit(1)
    os.execv(sys.executable, [sys.executable, "-m", "peftkit.cli", *sys.argv[1:]])


if __name__ == "__main__":
    main()
