"""What the run ensembles built from member runs share (``mer ensemble``'s soft vote, a stacked run): the
members' union of modalities and vector sizes, and their common folds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MemberRuns:
    """Member runs' fold ensembles scored as one (the interface of :class:`mer.train.ensemble.Ensemble`);
    subclasses say how the members' probabilities combine."""

    spec: dict[str, Any]
    members: list[Any]

    @property
    def modalities(self) -> list[str]:
        return list(self.spec["modalities"])

    @property
    def dims(self) -> dict[str, int]:
        return {m: d for member in self.members for m, d in member.dims.items()}

    @property
    def folds(self) -> list[int]:
        return list(self.members[0].folds)
