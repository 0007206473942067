"""What the values of one training setting may be: the one check configs and sweeps call.

A setting is what a compiled training program takes as data (:meth:`qsparse.wrap.Plan.init_spec`,
:func:`qsparse.training.make_spec`): weight and activation bits, block compression, the peak
learning rate and the block-lasso strength. Bits and compression follow the library's own rules
(:func:`qsparse.quant.check_bits`, :func:`qsparse.sparsity.check_compression`, which
:class:`qsparse.wrap.Rule` applies too). An error is one line naming the field, the value and
what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from qsparse import quant, sparsity

FIELDS = ("w_bits", "a_bits", "compression", "learning_rate", "prox_strength")


def check_learning_rate(value, name: str = "learning_rate") -> None:
    """Validates a peak learning rate: a finite value > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is not allowed: use a value > 0")


def check_prox_strength(value, name: str = "prox_strength") -> None:
    """Validates a block-lasso strength: a finite value >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r} is not allowed: use a value >= 0")


_CHECKS = {
    "w_bits": quant.check_bits,
    "a_bits": quant.check_bits,
    "compression": sparsity.check_compression,
    "learning_rate": check_learning_rate,
    "prox_strength": check_prox_strength,
}


def check_setting(values: Mapping, names: Mapping[str, str] | None = None) -> None:
    """Checks the values of one setting.

    Args:
      values: fields of :data:`FIELDS` and their values (a field left out is not checked).
      names: how an error names a field, e.g. ``{"w_bits": "quant.w_bits"}`` (default: the
        field itself).

    Raises:
      ValueError: the first bad value, in one line naming the field, the value and what is
        allowed.
    """
    names = names or {}
    for field, value in values.items():
        if field not in _CHECKS:
            raise ValueError(f"{field!r} is not a setting field: use one of {FIELDS}")
        name = names.get(field, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            kind = type(value).__name__
            raise ValueError(f"{name}={value!r} is not allowed: use a number, not a {kind}")
        _CHECKS[field](value, name)
