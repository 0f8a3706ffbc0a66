"""Orthogonality penalties for JAX, with closed-form ``custom_vjp`` gradients.

See :func:`orthogonality_penalty` for the math.
"""

from ._constraint import AddOrthogonalityConstraintState as AddOrthogonalityConstraintState
from ._constraint import add_orthogonality_constraint as add_orthogonality_constraint
from ._constraint import orthogonality_metrics as orthogonality_metrics
from ._conv import conv_orthogonality_error as conv_orthogonality_error
from ._conv import conv_orthogonality_penalty as conv_orthogonality_penalty
from ._conv import conv_orthogonality_penalty_grad as conv_orthogonality_penalty_grad
from ._conv_spectrum import conv_singular_values as conv_singular_values
from ._frameworks import dimension_numbers_for as dimension_numbers_for
from ._manifold import LandingState as LandingState
from ._manifold import landing as landing
from ._manifold import project_orthonormal as project_orthonormal
from ._penalty import orthogonality_error as orthogonality_error
from ._penalty import orthogonality_penalty as orthogonality_penalty
from ._penalty import orthogonality_penalty_grad as orthogonality_penalty_grad
from ._rules import Norm as Norm
from ._rules import Subgradient as Subgradient
from ._rules import deadzone as deadzone
from ._rules import huber as huber
from ._rules import spectral as spectral
from ._select import ConvDims as ConvDims
from ._select import OrthoDims as OrthoDims
from ._summary import summary as summary
from ._transform import AddOrthogonalityPenaltyState as AddOrthogonalityPenaltyState
from ._transform import add_orthogonality_penalty as add_orthogonality_penalty
from ._transform import tree_orthogonality_penalty as tree_orthogonality_penalty

__version__ = "0.4.0"

__all__ = [
    "AddOrthogonalityConstraintState",
    "AddOrthogonalityPenaltyState",
    "ConvDims",
    "LandingState",
    "Norm",
    "OrthoDims",
    "Subgradient",
    "add_orthogonality_constraint",
    "add_orthogonality_penalty",
    "conv_orthogonality_error",
    "conv_orthogonality_penalty",
    "conv_orthogonality_penalty_grad",
    "conv_singular_values",
    "deadzone",
    "dimension_numbers_for",
    "huber",
    "landing",
    "orthogonality_error",
    "orthogonality_metrics",
    "orthogonality_penalty",
    "orthogonality_penalty_grad",
    "project_orthonormal",
    "spectral",
    "summary",
    "tree_orthogonality_penalty",
]
