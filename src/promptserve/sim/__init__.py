"""The simulator: the policy core driven by a virtual clock, modelled workers, an offline bound."""

from promptserve.sim.oracle import oracle_bounds
from promptserve.sim.records import Records
from promptserve.sim.simulator import SimInputs, SimResult, simulate

__all__ = ["Records", "SimInputs", "SimResult", "oracle_bounds", "simulate"]
