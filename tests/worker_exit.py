"""How the ``torchrun`` workers of the tests end: a clean shutdown of the process group, then no interpreter teardown.

With torch 2.14.1 and gloo on CPU, a process whose work is done (its report written) can still abort in exit-time
C++ destructors (``terminate called without an active exception``, SIGABRT), which torchrun reports as a failed
run. The work under test is over by then, so the worker leaves with ``os._exit`` once its report is flushed.
"""

import os
import sys

from emc2_hf.training.distributed import shutdown_process_group


def finish(status: int = 0) -> None:
    """Barrier and destroy the process group (if any), flush the output, and leave without interpreter teardown."""
    shutdown_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
