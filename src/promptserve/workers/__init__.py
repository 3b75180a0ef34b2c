"""Where work runs: the ``Workers`` interface (``base.py``), its in-process implementation
(``local.py``), one step-level call (``steps.py``) and the one call for any work a scheduler
hands out (``execute.py``)."""

from promptserve.workers.base import StoreRefs, WorkerLost, Workers
from promptserve.workers.execute import Executed, Prepared, execute
from promptserve.workers.local import LocalWorkers, compute_threads
from promptserve.workers.steps import StepCall, StepDone, advance

__all__ = [
    "Executed",
    "LocalWorkers",
    "Prepared",
    "StepCall",
    "StepDone",
    "StoreRefs",
    "WorkerLost",
    "Workers",
    "advance",
    "compute_threads",
    "execute",
]
