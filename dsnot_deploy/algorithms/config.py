"""Enums and frozen configuration dataclasses, validated at construction.

Strings are parsed only by the CLI; everything below it takes these typed configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from dsnot_deploy.errors import UserInputError


class Method(str, Enum):
    """How the initial mask is chosen (algorithms.md section 3)."""

    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


class Refinement(str, Enum):
    """What improves the initial mask (algorithms.md sections 4 and 4b)."""

    NONE = "none"
    DSNOT = "dsnot"  # faithful DSnoT: mean-error objective
    EXACT = "exact"  # exact calibration output error dw^T H dw


class Update(str, Enum):
    """What happens to the kept weights once the mask is final (algorithms.md section 4c)."""

    NONE = "none"  # keep them (SparseGPT has already updated its own)
    ADMM = "admm"  # reconstruct them: minimise the calibration output error on the mask


class Solver(str, Enum):
    """How the reconstruction's least-squares problem is solved (algorithms.md section 4c)."""

    ADMM = "admm"  # one eigh of Hd, 2 products per step
    CG = "cg"  # conjugate gradients on the kept entries, 1 product per step, no factorisation
    AUTO = "auto"  # ADMM below ReconstructConfig.cg_from_cols input columns, CG from there


class Allocation(str, Enum):
    """How the target sparsity is spread over the decoder layers (docs/allocation.md)."""

    UNIFORM = "uniform"  # every layer at the target
    OWL = "owl"  # outlier-weighted layer-wise sparsity (Yin et al. 2024)
    AUTO = "auto"  # the measured choice per pattern: OWL from OWL_FROM_SPARSITY up, else uniform


# `--allocation auto` (opt-in) switches to OWL at this unstructured sparsity and above: the pipeline grid
# (docs/bench_pipeline.md, WikiText-2 validation) found OWL worse at 50% and better at 70% on SmolLM2
# without model correction. With the default model correction OWL lost at 70% on Gemma3-270M, so the
# default allocation is uniform (docs/decisions.md).
OWL_FROM_SPARSITY = 0.7


# `--model-correction`: chosen on held-out C4 windows (docs/decisions.md) and kept because the pipeline grid
# (docs/bench_pipeline.md) measured it ahead of no correction on validation text at every pattern it ran
DEFAULT_MODEL_CORRECTION = 0.25


class VarianceKind(str, Enum):
    WITHIN_SAMPLE = "within-sample"  # reference parity: mean of per-sample variances
    POOLED = "pooled"  # variance over all B*L tokens (Chan merge)


class MagnitudeScope(str, Enum):
    PER_MATRIX = "per-matrix"  # the paper's magnitude baseline
    PER_ROW = "per-row"  # the reference's magnitude init of DSnoT


@dataclass(frozen=True)
class SparsityPattern:
    """Unstructured sparsity `sparsity` in (0, 1), or N:M = N zeros in every M consecutive columns."""

    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m:
            if not (0 < self.n < self.m):
                raise UserInputError(f"N:M pattern needs 0 < N < M; got {self.n}:{self.m}")
            if not math.isclose(self.sparsity, self.n / self.m):
                raise UserInputError("N:M pattern sparsity must equal N/M")
        elif not (isinstance(self.sparsity, float | int) and 0.0 < self.sparsity < 1.0):
            raise UserInputError(f"sparsity must be in (0, 1); got {self.sparsity!r}")

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @classmethod
    def unstructured(cls, sparsity: float) -> SparsityPattern:
        if isinstance(sparsity, float) and math.isnan(sparsity):
            raise UserInputError("sparsity must be in (0, 1); got nan")
        return cls(sparsity=float(sparsity))

    @classmethod
    def nm(cls, n: int, m: int) -> SparsityPattern:
        if m <= 0 or n <= 0 or n >= m:
            raise UserInputError(f"N:M pattern needs 0 < N < M; got {n}:{m}")
        return cls(sparsity=n / m, n=n, m=m)

    @classmethod
    def parse(cls, text: str) -> SparsityPattern:
        """'2:4' -> N:M, '0.6' -> unstructured."""
        try:
            if ":" in text:
                n_str, m_str = text.split(":", 1)
                return cls.nm(int(n_str), int(m_str))
            return cls.unstructured(float(text))
        except ValueError:
            raise UserInputError(f"pattern must be a sparsity like 0.6 or N:M like 2:4; got {text!r}") from None

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%} unstructured"


@dataclass(frozen=True)
class DSnoTConfig:
    """Faithful DSnoT options (algorithms.md section 4); defaults are the reference's."""

    max_cycle_time: int = 50  # swaps per row at most
    update_threshold: float = 0.1  # a row stops once |mean error| <= this
    pow_of_var_regrowing: float = 1.0  # grow key = c / var^p; 0 disables the division
    same_sign: bool | None = None  # None: off for unstructured, on for N:M (reference)
    variance: VarianceKind = VarianceKind.WITHIN_SAMPLE

    def __post_init__(self) -> None:
        if self.max_cycle_time < 0:
            raise UserInputError(f"max_cycle_time must be >= 0; got {self.max_cycle_time}")
        if not self.update_threshold >= 0:
            raise UserInputError(f"update_threshold must be >= 0; got {self.update_threshold}")
        if not self.pow_of_var_regrowing >= 0:
            raise UserInputError(f"pow_of_var_regrowing must be >= 0; got {self.pow_of_var_regrowing}")


@dataclass(frozen=True)
class ExactConfig:
    """Exact-error prune-and-grow (algorithms.md section 4b)."""

    max_swaps: int = 128  # per row; each accepted swap strictly lowers the row error
    top_k: int = 8  # candidates per side evaluated jointly (K x K pairs, cross term included)
    pool: int = 32  # per-row candidate pool per side, from which the K best are taken each swap
    refresh_every: int = 8  # swaps between rebuilds of the pool from the whole row (1 = every swap)
    rel_tol: float = 1e-7  # a swap must lower the row error by more than rel_tol * dense row energy
    # calibration guard: the search judges swaps on (1 - shrink) H + shrink diag(H), which trusts the
    # calibration tokens' channel correlations less; 0.3 chosen on held-out (validation) windows
    # (docs/decisions.md, "Calibration"); 0 is the plain exact search
    shrink: float = 0.3

    def __post_init__(self) -> None:
        if self.max_swaps < 0 or self.top_k < 1 or self.pool < 1 or self.refresh_every < 1:
            raise UserInputError(f"exact refinement needs max_swaps >= 0 and top_k >= 1; got {self}")
        if not 0.0 <= self.shrink <= 1.0:
            raise UserInputError(f"expected the exact search's shrink toward diag(H) in [0, 1]; found {self.shrink}")


@dataclass(frozen=True)
class SparseGPTConfig:
    blocksize: int = 128
    percdamp: float = 0.01  # lambda = percdamp * mean(diag H)


@dataclass(frozen=True)
class ReconstructConfig:
    """ADMM weight reconstruction (algorithms.md section 4c): ``iterations`` steps; ``rho`` the first
    penalty as a multiple of mean(diag Hd), multiplied by ``growth`` every step; ``damping`` as
    SparseGPT's percdamp."""

    # chosen on real SmolLM2 layers (docs/bench_reconstruct.md): this schedule comes within 0.2% of
    # the exact minimiser in 40 steps; damping 0.1 gives the lowest held-out output error (C4
    # validation windows), 0.01 fits the 8k calibration tokens more closely and generalises worse
    iterations: int = 40
    rho: float = 0.05
    growth: float = 1.1
    damping: float = 0.1
    # rounds of (exact mask search, reconstruction); rounds after the first re-run the exact search
    # against the reconstructed weights (only with the exact refinement)
    rounds: int = 1
    # the solver; AUTO keeps ADMM (above) on Linears narrower than cg_from_cols columns and uses conjugate
    # gradients from there: on real SmolLM2 layers 20 CG steps come within 0.1% of the 40 ADMM steps' held-out
    # error for about half the products and no eigh (docs/bench_reconstruct_scale.md); the threshold only
    # keeps the results at small widths (SmolLM2, the tests' tiny models) as they were
    solver: Solver = Solver.AUTO
    cg_from_cols: int = 2048
    cg_iterations: int = 20  # CG steps at most
    cg_tol: float = 1e-5  # CG stops once a step lowers the damped objective by less than this fraction of it
    # 0: match the dense Linear on the inputs it sees in the pruned model; A in (0, 1]: minimise
    # (1 - A) x that + A x the error against the dense *model's* outputs, which also corrects the error the
    # layers pruned before left in the inputs (the driver then carries the dense model's activations too)
    model_correction: float = DEFAULT_MODEL_CORRECTION  # used only with Update.ADMM

    def __post_init__(self) -> None:
        if self.iterations < 1 or not self.rho > 0 or not self.growth >= 1 or not self.damping >= 0 or self.rounds < 1:
            raise UserInputError(f"expected iterations >= 1, rho > 0, growth >= 1, damping >= 0 and rounds >= 1; "
                                 f"found {self}")
        if not 0.0 <= self.model_correction <= 1.0:
            raise UserInputError(f"expected the model correction in [0, 1]; found {self.model_correction}")
        if not isinstance(self.solver, Solver) or self.cg_from_cols < 1 or self.cg_iterations < 1 \
                or not self.cg_tol >= 0:
            raise UserInputError(f"expected a Solver, cg_from_cols >= 1, cg_iterations >= 1 and cg_tol >= 0; "
                                 f"found {self}")


@dataclass(frozen=True)
class AllocationConfig:
    """Layer-wise allocation; OWL's outlier threshold M and spread lambda default to the paper's
    LLaMA values (M = 5, lambda = 0.08). N:M patterns are per-group rules and always uniform."""

    kind: Allocation = Allocation.UNIFORM
    outlier_threshold: float = 5.0
    spread: float = 0.08

    def resolved(self, pattern: SparsityPattern) -> Allocation:
        """The rule that applies to ``pattern``: AUTO becomes OWL or UNIFORM; N:M is always UNIFORM."""
        if pattern.is_nm:
            return Allocation.UNIFORM
        if self.kind is Allocation.AUTO:
            return Allocation.OWL if pattern.sparsity >= OWL_FROM_SPARSITY - 1e-9 else Allocation.UNIFORM
        return self.kind

    def __post_init__(self) -> None:
        if not self.outlier_threshold > 0 or not 0 <= self.spread < 0.5:
            raise UserInputError(f"expected outlier threshold M > 0 and spread lambda in [0, 0.5); found "
                                 f"M={self.outlier_threshold}, lambda={self.spread}")


LAYER_GROUPS = ("attn", "mlp")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides which weights of a Linear are zeroed."""

    method: Method = Method.WANDA
    pattern: SparsityPattern = field(default_factory=lambda: SparsityPattern.unstructured(0.5))
    refinement: Refinement = Refinement.EXACT
    magnitude_scope: MagnitudeScope = MagnitudeScope.PER_ROW
    dsnot: DSnoTConfig = field(default_factory=DSnoTConfig)
    exact: ExactConfig = field(default_factory=ExactConfig)
    sparsegpt: SparseGPTConfig = field(default_factory=SparseGPTConfig)
    skip_refine_groups: tuple[str, ...] = ()  # "attn" and/or "mlp": pruned but not refined
    update: Update = Update.ADMM  # the measured default pipeline (docs/decisions.md)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)

    def __post_init__(self) -> None:
        bad = [g for g in self.skip_refine_groups if g not in LAYER_GROUPS]
        if bad:
            raise UserInputError(f"skip groups must be among {LAYER_GROUPS}; got {bad}")
        if self.reconstruct.rounds > 1 and (self.refinement is not Refinement.EXACT or self.update is not Update.ADMM):
            raise UserInputError(f"expected --refine exact and --update admm for {self.reconstruct.rounds} rounds of "
                                 f"search and reconstruction; found --refine {self.refinement.value} and --update "
                                 f"{self.update.value}")

    @property
    def matches_dense_model(self) -> bool:
        """True when the reconstruction matches the dense model's outputs (the driver keeps a dense stream)."""
        return self.update is Update.ADMM and self.reconstruct.model_correction > 0

    @property
    def allocates(self) -> bool:
        """True when layers get their own sparsity (a non-uniform rule on an unstructured pattern)."""
        return self.allocation.resolved(self.pattern) is not Allocation.UNIFORM

    @property
    def needs_hessian(self) -> bool:
        return self.method is Method.SPARSEGPT or self.refinement is Refinement.EXACT or self.update is Update.ADMM
