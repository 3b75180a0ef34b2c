"""Step-level serving's scheduler, in parts that each own one thing (``scheduler.py`` says
which)."""

from promptserve.policy.step.config import KRule, StepConfig, StepSpec
from promptserve.policy.step.excess import ExcessWork
from promptserve.policy.step.gpu import Member, StepGpu
from promptserve.policy.step.levels import Levels
from promptserve.policy.step.price import EXCESS_SHARE, PRICE_MAX, SLO_SHARE, UTILISATION
from promptserve.policy.step.scheduler import Repricing, StepScheduler

__all__ = [
    "EXCESS_SHARE",
    "PRICE_MAX",
    "SLO_SHARE",
    "UTILISATION",
    "ExcessWork",
    "KRule",
    "Levels",
    "Member",
    "Repricing",
    "StepConfig",
    "StepGpu",
    "StepScheduler",
    "StepSpec",
]
