"""Finding and rewriting the weight operations of any JAX function, at the primitive level.

A model is traced once to a jaxpr (``jax.make_jaxpr``) and evaluated again by a small
interpreter, the pattern of JAX's "Writing custom Jaxpr interpreters" guide. Every equation is
re-bound as it was, except the *covered operations*: a ``dot_general`` or
``conv_general_dilated`` one of whose operands is a parameter (a parameter leaf, possibly
reshaped, transposed or cast), and a ``gather`` from a parameter (an embedding lookup). A hook
receives each covered operation with its operands and may replace its result; with no hook
(or a hook that binds the operation unchanged) the interpreter computes exactly what the
function computes.

This covers every layer that multiplies by a parameter, whatever framework defines it: Linen
``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``, ``Embed`` and NNX ``Linear``,
``LinearGeneral``, ``Einsum``, ``Conv``, ``Embed``, and hand-written ``x @ w``. Calls of
jitted functions, remat bodies (``jax.checkpoint``, ``nn.remat``, ``nnx.remat``; kept
rematerialised) and scan bodies (``lax.scan``, ``nn.scan``, ``nn.RNN``: weights passed in whole,
or stacked and sliced per step) are entered; other higher-order primitives (``while``,
``cond``, custom derivatives) run as they are, and a parameter used only inside one stays
uncovered (:attr:`Trace.hidden` lists them).

The interpreter also tracks which values are provably non-negative (outputs of ReLU, ``max``
with a non-negative operand, pooling, products and sums of non-negative values, ``exp``,
``abs``, ...), so an activation quantizer can be unsigned where its input cannot be negative.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

MATMUL = "dot_general"
CONV = "conv_general_dilated"
GATHER = "gather"
# Primitives that only move, cast or reshape a parameter: the result is still "the weight".
VIEWS = frozenset(
    {
        "reshape",
        "transpose",
        "convert_element_type",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "copy",
        "copy_p",
    }
)
# Primitives whose result is non-negative when every operand is.
_NONNEG_ALL = frozenset(
    {
        "add",
        "mul",
        "div",
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_window_sum",
        "reduce_window_max",
        "reduce_window_min",
        "cumsum",
        "cummax",
        "pad",
        "concatenate",
        "slice",
        "dynamic_slice",
        "gather",
        "sqrt",
        "rsqrt",
        "min",
        "reduce_precision",
        "sort",
        *VIEWS,
    }
)
# Primitives whose result is non-negative whatever the operands.
_NONNEG_ANY = frozenset({"exp", "exp2", "abs", "logistic", "square", "erfc"})
_CALLS = ("pjit", "jit", "closed_call", "core_call")
REMAT = "remat2"  # ``jax.checkpoint`` / ``nn.remat`` / ``nnx.remat``: entered, kept rematerialised
SCAN = "scan"  # ``lax.scan`` / ``nn.scan`` / ``nn.RNN``: its body entered on every iteration
INPUT = "input"  # origin of the function's input in the interpreter (parameters: leaf index)


@dataclasses.dataclass(frozen=True)
class Site:
    """One covered operation met while evaluating.

    Attributes:
      kind: ``"dot_general"``, ``"conv_general_dilated"`` or ``"gather"``.
      param: index of the parameter leaf that is its weight (flat order of ``params``).
      weight: operand position of the weight.
      nonneg: whether the other (activation) operand is provably non-negative.
      order: position of the operation in evaluation order.
      reads_input: the activation operand is the function's input (``evaluate``'s
        ``input_arg``) itself, reshaped or cast at most.
    """

    kind: str
    param: int
    weight: int
    nonneg: bool
    order: int
    reads_input: bool = False


@dataclasses.dataclass
class Trace:
    """A function traced for interception.

    Attributes:
      jaxpr: the closed jaxpr of ``fn(params, *args)``.
      n_params: number of parameter leaves (the first inputs of the jaxpr).
      out_tree: the output's tree structure.
      hidden: parameter leaf indices used by a primitive the interpreter does not enter.
    """

    jaxpr: Any
    n_params: int
    out_tree: Any
    hidden: frozenset = frozenset()


def trace(fn: Callable, params, *args) -> Trace:
    """Traces ``fn(params, *args)`` (shapes only) for :func:`evaluate`.

    Args:
      fn: a pure function; ``params`` is the tree whose leaves count as weights.
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      *args: the other arguments (arrays, keys or ``ShapeDtypeStruct``).

    Returns:
      The :class:`Trace`.
    """
    p_leaves, p_tree = jax.tree.flatten(params)
    a_leaves, a_tree = jax.tree.flatten(args)

    def flat(*leaves):
        p = jax.tree.unflatten(p_tree, leaves[: len(p_leaves)])
        a = jax.tree.unflatten(a_tree, leaves[len(p_leaves) :])
        return fn(p, *a)

    closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*p_leaves, *a_leaves)
    out_tree = jax.tree.structure(out_shape)
    hidden: set[int] = set()
    n = len(p_leaves)
    _scan_hidden(
        closed.jaxpr, [i if i < n else None for i in range(len(closed.jaxpr.invars))], hidden
    )
    return Trace(closed, n, out_tree, frozenset(hidden))


def _inner(eqn):
    """The closed jaxpr of a call or remat primitive the interpreter enters, else None."""
    if eqn.primitive.name in _CALLS:
        j = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        return j if isinstance(j, jcore.ClosedJaxpr) else None
    if eqn.primitive.name == REMAT:
        return jcore.ClosedJaxpr(eqn.params["jaxpr"], ())
    return None


def _scan_hidden(jaxpr, origin: list, hidden: set) -> None:
    """Records parameter leaves that flow into a higher-order primitive not entered."""
    env = {v: o for v, o in zip(jaxpr.invars, origin)}
    for eqn in jaxpr.eqns:
        ins = [env.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        inner = _inner(eqn)
        if inner is not None:
            _scan_hidden(inner.jaxpr, ins, hidden)
            continue
        if eqn.primitive.name == SCAN:
            _scan_hidden(eqn.params["jaxpr"].jaxpr, _scan_inputs(eqn, ins, None), hidden)
            continue
        if eqn.primitive.name in VIEWS and ins and ins[0] is not None:
            env[eqn.outvars[0]] = ins[0]
            continue
        if list(jcore.jaxprs_in_params(eqn.params)):
            hidden.update(o for o in ins if o is not None)


def _literal_nonneg(v) -> bool:
    try:
        return bool(np.all(np.asarray(v) >= 0))
    except (TypeError, ValueError):
        return False


def _static_nonneg(jaxpr, flags: Sequence[bool], consts=()) -> list[bool]:
    """Non-negativity of a jaxpr's outputs from its inputs' (for custom-derivative calls)."""
    env = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = _literal_nonneg(c)
    env.update(zip(jaxpr.invars, flags))

    def read(v):
        return _literal_nonneg(v.val) if isinstance(v, jcore.Literal) else env.get(v, False)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _eqn_nonneg(eqn, ins)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _eqn_nonneg(eqn, ins: list[bool]) -> list[bool]:
    name = eqn.primitive.name
    n = len(eqn.outvars)
    if name == "max":
        return [any(ins)] * n
    if name in _NONNEG_ANY:
        return [True] * n
    if name == "integer_pow":
        return [eqn.params["y"] % 2 == 0 or all(ins)] * n
    if name == "select_n":  # the predicate does not matter, only the cases
        return [all(ins[1:])] * n
    if name in _NONNEG_ALL:
        return [all(ins)] * n
    inner = _inner(eqn)
    if inner is None:
        j = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
        if isinstance(j, jcore.ClosedJaxpr):
            inner = j
    if inner is not None and len(inner.jaxpr.invars) == len(ins):
        return _static_nonneg(inner.jaxpr, ins, inner.consts)
    return [False] * n


Hook = Callable[[Site, Any, list, dict], Any]


def evaluate(tr: Trace, hook: Hook | None, params, *args, input_arg: int | None = None):
    """Evaluates a :class:`Trace` on new values, handing each covered operation to ``hook``.

    Args:
      tr: from :func:`trace` (the same tree structures and shapes).
      hook: ``hook(site, primitive, operands, bind_params) -> result`` for each covered
        operation, or None. ``primitive.bind(*operands, **bind_params)`` is the unchanged
        result.
      params: the parameter tree.
      *args: the other arguments.
      input_arg: index into ``args`` of the function's input, for :attr:`Site.reads_input`.

    Returns:
      ``fn(params, *args)``'s output, with the hook's results in place of the covered
      operations' results.
    """
    leaves = jax.tree.leaves(params)
    origin: list = list(range(len(leaves)))
    for i, a in enumerate(args):
        n = len(jax.tree.leaves(a))
        leaves += jax.tree.leaves(a)
        origin += [INPUT if i == input_arg else None] * n
    values, _, _ = _eval(
        tr.jaxpr.jaxpr, tr.jaxpr.consts, leaves, origin, [False] * len(leaves), hook, [0]
    )
    return jax.tree.unflatten(tr.out_tree, values)


def _eval(jaxpr, consts, args, origin, nonneg, hook, counter):
    env: dict = {}
    org: dict = {}
    pos: dict = {}
    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
        pos[v] = _literal_nonneg(c)
    for v, a, o, n in zip(jaxpr.invars, args, origin, nonneg):
        env[v] = a
        org[v] = o
        pos[v] = n

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def flag(v):
        return _literal_nonneg(v.val) if isinstance(v, jcore.Literal) else pos.get(v, False)

    def source(v):
        return None if isinstance(v, jcore.Literal) else org.get(v)

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        srcs = [source(v) for v in eqn.invars]
        flags = [flag(v) for v in eqn.invars]
        name = eqn.primitive.name
        inner = _inner(eqn)
        if inner is not None or name == SCAN:
            enter = _enter if inner is not None else _enter_scan
            outs, oflags, origins = enter(eqn, inner, invals, srcs, flags, hook, counter)
            for v, val, f, o in zip(eqn.outvars, outs, oflags, origins):
                env[v], pos[v], org[v] = val, f, o
            continue
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        site = _site(name, srcs, flags)
        if site is not None:
            site = dataclasses.replace(site, order=counter[0])
            counter[0] += 1
        ans = _bind(eqn, invals, bind_params, site, hook)
        outs = ans if eqn.primitive.multiple_results else [ans]
        oflags = _eqn_nonneg(eqn, flags)
        for v, val, f in zip(eqn.outvars, outs, oflags):
            env[v], pos[v] = val, f
        if name in VIEWS and srcs and srcs[0] is not None:
            org[eqn.outvars[0]] = srcs[0]
    return (
        [read(v) for v in jaxpr.outvars],
        [flag(v) for v in jaxpr.outvars],
        [source(v) for v in jaxpr.outvars],
    )


def _enter(eqn, inner, invals, srcs, flags, hook, counter):
    """Evaluates a call's body; a remat body under ``jax.checkpoint`` with its settings, so
    it stays rematerialised. Returns the outputs, their non-negativity and their origins."""
    found = []

    def body(*vals):
        res = _eval(inner.jaxpr, inner.consts, list(vals), srcs, flags, hook, counter)
        found.append(res[1:])
        return res[0]

    if eqn.primitive.name == REMAT:
        p = eqn.params
        body = jax.checkpoint(body, prevent_cse=p["prevent_cse"], policy=p["policy"])
    outs = body(*invals)
    return outs, *found[-1]


def _scan_inputs(eqn, values: list, carry) -> list:
    """A scan's inputs with each carry replaced by ``carry``: constants and scanned-over
    inputs keep what they are (a weight, or a stack of layer weights sliced per step)."""
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    return [*values[:nc], *[carry] * nk, *values[nc + nk :]]


def _enter_scan(eqn, inner, invals, srcs, flags, hook, counter):
    """Runs a scan again with the interpreter as its body (``lax.scan`` with the equation's
    length, direction and unrolling). The carry counts as possibly negative and as no weight.
    Returns the outputs, their non-negativity and their origins."""
    del inner
    p = eqn.params
    body_jaxpr, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    srcs, flags = _scan_inputs(eqn, srcs, None), _scan_inputs(eqn, flags, False)
    found = []

    def body(carry, x):
        vals = [*consts, *carry, *x]
        outs, oflags, _ = _eval(
            body_jaxpr.jaxpr, body_jaxpr.consts, vals, srcs, flags, hook, counter
        )
        found.append(oflags)
        return outs[:nk], outs[nk:]

    carry, ys = jax.lax.scan(
        body, list(init), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    outs = [*carry, *ys]
    return outs, [False] * nk + found[-1][nk:], [None] * len(outs)


def _bind(eqn, invals, bind_params, site, hook):
    """Runs one equation: through ``hook`` at a covered site, else as it is."""
    with eqn.ctx.manager:
        if site is not None and hook is not None:
            return hook(site, eqn.primitive, invals, bind_params)
        return eqn.primitive.bind(*invals, **bind_params)


def _site(name: str, srcs: list, flags: list) -> Site | None:
    """The covered operation an equation is, if any."""
    weights = [isinstance(s, int) for s in srcs]
    if name in (MATMUL, CONV) and len(srcs) >= 2:
        if weights[1] and not weights[0]:
            return Site(name, srcs[1], 1, flags[0], 0, srcs[0] == INPUT)
        if weights[0] and not weights[1] and name == MATMUL:
            return Site(name, srcs[0], 0, flags[1], 0, srcs[1] == INPUT)
        return None
    if name == GATHER and srcs and weights[0]:
        return Site(name, srcs[0], 0, False, 0)
    return None
