"""The arrivals' size mix and what a step costs under it: what the price's capacity and the
queue's estimates count on when the sizes of future batches are not known."""

from __future__ import annotations

from mypy_extensions import mypyc_attr

from promptserve.steptime import StepProfile, kind


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # copyable (``native``)
class SizeMix:
    def __init__(self, profile: StepProfile) -> None:
        self.profile = profile
        self.arrived = [0] * len(profile.shape_weights)  # arrivals per size

    def note(self, shape: int) -> None:
        if self.profile.sized:
            self.arrived[shape] += 1

    @property
    def shares(self) -> tuple[float, ...]:
        """The arrivals' share of each size so far (all native before any arrives)."""
        total = sum(self.arrived)
        if not total:
            return (1.0,) + (0.0,) * (len(self.arrived) - 1)
        return tuple(c / total for c in self.arrived)

    def member_s(self, n: int, shape: int | None = None, r: int = 1) -> float:
        """An iteration of ``n`` members of ``shape``, or (None) of ``n`` members drawn from
        the arrivals' size mix. A size is in the batch with probability ``1 - (1 - p) ** n``
        and then holds ``n p`` over that many members, each present size a call (exact where
        the step curve is affine, as the reference's is; conservative where placement groups
        sizes); ``r``: their feature-cache interval."""
        profile = self.profile
        if not profile.mixed:
            return profile.iteration_s(n)
        if shape is not None:
            return profile.member_s(n, shape, r)
        if not profile.sized:
            return profile.member_s(n, 0, r)
        total, w = 0.0, profile.shape_weights
        for s, p in enumerate(self.shares):
            if p > 0:
                present = 1.0 - (1.0 - p) ** n
                if r == 1:
                    total += present * profile.call_s(n * p / present * w[s])
                else:  # its full and cached calls (``StepProfile.mix_s``)
                    total += present * profile.mix_s({kind(s, r): n * p / present})
        return total
