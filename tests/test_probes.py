"""The step-profile probe's parsing of compiled HLO and of traced op intervals."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import probes  # noqa: E402


def _two_outputs(a, b):
    return a @ b, jnp.sin(a) * 2.0


def test_union_counts_overlaps_once():
    ns = 1e6
    assert probes._union_ms([(1 * ns, 3 * ns), (0, 2 * ns), (5 * ns, 6 * ns)]) == 4.0
    assert probes._union_ms([(0, 4 * ns), (1 * ns, 2 * ns)]) == 4.0


def test_hlo_ops_find_the_matmul_and_the_source_line():
    a = jnp.ones((64, 64))
    hlo = jax.jit(_two_outputs).lower(a, a).compile().as_text()
    ops = probes._hlo_ops(hlo)
    matmuls = [k for k, v in ops.items() if v["matmul"]]
    assert matmuls, "the dot was not recognised"
    sin = [v for v in ops.values() if not v["matmul"] and v["source"].endswith("_two_outputs")]
    assert sin, "the elementwise op's source line was not resolved"
    assert sin[0]["source"].startswith("tests/test_probes.py:")


def test_async_matmul_ends_at_its_end_event():
    ops = {
        "dot.1": {"opcode": "dot", "matmul": True},
        "add.1": {"opcode": "fusion", "matmul": False},
        "cond.1": {"opcode": "conditional", "matmul": False},
    }
    events = [
        (0, 100, "dot.1"),  # launch only: the pool runs the dot until its end event
        (150, 50, "add.1"),
        (300, 0, "end: add.1"),  # an elementwise op's end event is not its work
        (500, 0, "end: dot.1"),
        (600, 100, "dot.1"),  # the next step's dot, completing inline
        (700, 0, "end: dot.1"),
        (0, 900, "cond.1"),  # control flow: timed around the ops it runs, not counted
        (0, 10, "ThunkExecutor::Execute"),
    ]
    got = sorted(probes._op_intervals(events, ops))
    assert got == [(0, 500, "dot.1"), (150, 200, "add.1"), (600, 700, "dot.1")]
