"""The validation gate: thresholds on the measured comparison, and each check's verdict and margin."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dsnot_deploy.errors import UserInputError

if TYPE_CHECKING:
    from dsnot_deploy.evaluation.validate import ValidationResult


@dataclass(frozen=True)
class GateConfig:
    """Thresholds; each None is not checked.

    ``max_ppl_ratio``: sparse ppl / dense ppl must be <= this. ``max_ppl_increase``: sparse ppl -
    dense ppl (perplexity points) must be <= this. ``max_kld``: mean KL(dense || sparse) in nats must
    be <= this. ``min_top1``: top-1 agreement, a fraction in [0, 1], must be >= this.
    """

    max_ppl_ratio: float | None = None
    max_ppl_increase: float | None = None
    max_kld: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio > 0:
            raise UserInputError(f"expected --max-ppl-ratio > 0, found {self.max_ppl_ratio}")
        if self.max_ppl_increase is not None and not math.isfinite(self.max_ppl_increase):
            raise UserInputError(f"expected a finite --max-ppl-increase, found {self.max_ppl_increase}")
        if self.max_kld is not None and not self.max_kld >= 0:
            raise UserInputError(f"expected --max-kld >= 0, found {self.max_kld}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise UserInputError(f"expected --min-top1 as a fraction in [0, 1] (0.9 = 90%), found {self.min_top1}")

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.max_ppl_ratio, self.max_ppl_increase, self.max_kld, self.min_top1))

    def check(self, result: ValidationResult) -> list[GateCheck]:
        """One :class:`GateCheck` per given threshold, in a fixed order."""
        checks = []
        if self.max_ppl_ratio is not None:
            checks.append(GateCheck("ppl ratio (sparse/dense)", result.ppl_ratio, self.max_ppl_ratio, "<=", "--max-ppl-ratio"))
        if self.max_ppl_increase is not None:
            checks.append(GateCheck("ppl increase (sparse-dense)", result.ppl_increase, self.max_ppl_increase, "<=",
                                    "--max-ppl-increase"))
        if self.max_kld is not None:
            checks.append(GateCheck("mean KLD", result.kld_mean, self.max_kld, "<=", "--max-kld"))
        if self.min_top1 is not None:
            checks.append(GateCheck("top-1 agreement", result.top1, self.min_top1, ">=", "--min-top1"))
        return checks


@dataclass(frozen=True)
class GateCheck:
    """One threshold against its measured value."""

    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    option: str

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.threshold if self.comparison == "<=" else self.value >= self.threshold

    @property
    def margin(self) -> float:
        """How far inside the threshold the value is (negative: by how much it fails)."""
        return self.threshold - self.value if self.comparison == "<=" else self.value - self.threshold

    def message(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        how = "within" if self.passed else "over" if self.comparison == "<=" else "under"
        return (f"{verdict}: {self.name} {self.value:.6g} {self.comparison} {self.threshold:.6g} ({self.option}): "
                f"{how} by {abs(self.margin):.6g}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "option": self.option, "value": self.value, "threshold": self.threshold,
                "comparison": self.comparison, "passed": self.passed, "margin": self.margin}
