"""The policy core: pure code, no clock of its own, no I/O. Simulator and server both drive it,
through the contract of ``contract.py``."""

from promptserve.policy.admission import admit
from promptserve.policy.aligner import align
from promptserve.policy.allocation import allocate
from promptserve.policy.contract import (
    Arrival,
    Ask,
    LoadSnapshot,
    Replan,
    Report,
    Schedule,
    Scheduler,
    StepWork,
    Work,
)
from promptserve.policy.dispatcher import DispatchConfig, Dispatcher
from promptserve.policy.estimator import LoadEstimator
from promptserve.policy.intake import intake
from promptserve.policy.joint import plan_joint
from promptserve.policy.policies import POLICIES, Policy, get_policy, parse_policies
from promptserve.policy.router import route
from promptserve.policy.types import BatchWork, Demand, Job, Outcome, Plan, Setting, Status

__all__ = [
    "POLICIES",
    "Arrival",
    "Ask",
    "BatchWork",
    "Demand",
    "DispatchConfig",
    "Dispatcher",
    "Job",
    "LoadEstimator",
    "LoadSnapshot",
    "Outcome",
    "Plan",
    "Policy",
    "Replan",
    "Report",
    "Schedule",
    "Scheduler",
    "Setting",
    "Status",
    "StepWork",
    "Work",
    "admit",
    "align",
    "allocate",
    "get_policy",
    "intake",
    "parse_policies",
    "plan_joint",
    "route",
]
