r"""Small performance probes behind statements in docs/PERFORMANCE.md.

The README's Performance section summarizes them.

    python scripts/probes.py chunked-adam        # Adam on a 1024^2 kernel: fused vs row-chunked
    python scripts/probes.py sweep-collectives   # all-reduces in a jit-sharded vmap vs shard_map
    python scripts/probes.py device-flag         # plain step with and without one device per core
    python scripts/probes.py step-profile        # where the joint step's time goes (b128 trace)
    python scripts/probes.py step-timeline       # one step's ops in start order (b128 trace)
    python scripts/probes.py page-cost           # microseconds per fresh 4 KiB page touched
    python scripts/probes.py step-windows        # bench step ratios with short and long scans
    python scripts/probes.py memory-state        # b128 prox ratio beside DRAM / cache bandwidth
    python scripts/probes.py ratio-drift         # b128 prox ratio over a 150-round race, in blocks
    python scripts/probes.py mask-forms          # a moment update's weight mask: select vs 0/1
    python scripts/probes.py input-order         # the input row: prefetch, order, gather forms

Each prints its numbers; none is a test. ``sweep-collectives`` and ``device-flag`` start
subprocesses, because the host device count is fixed when JAX starts.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median_ms(fn, args, reps: int = 9, per: int = 1) -> float:
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3 / per


def chunked_adam() -> None:
    """Adam on a 1024x1024 kernel as XLA fuses it, against the same update in a ``fori_loop``
    over 64-row chunks (to keep each chunk in cache): XLA:CPU copies the carried buffers."""
    import jax
    import jax.numpy as jnp

    r = c = 1024
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-3

    def adam(g, w, m, v):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        return w - lr * m / (jnp.sqrt(v) + eps), m, v

    def chunked(rows):
        def run(g, w, m, v):
            def body(i, carry):
                sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * rows, rows, 0)  # noqa: E731
                new = adam(sl(g), *(sl(a) for a in carry))
                return tuple(
                    jax.lax.dynamic_update_slice_in_dim(a, b, i * rows, 0)
                    for a, b in zip(carry, new)
                )

            return jax.lax.fori_loop(0, r // rows, body, (w, m, v))

        return run

    def steps(update, n=20):
        def run(g, w, m, v):
            body = lambda carry, _: (update(g, *carry), None)  # noqa: E731
            return jax.lax.scan(body, (w, m, v), None, length=n)[0]

        return jax.jit(run)

    ks = jax.random.split(jax.random.key(0), 4)
    args = [jax.random.normal(k, (r, c)) for k in ks]
    print(f"fused Adam step:        {_median_ms(steps(adam), args, per=20):.3f} ms")
    print(f"64-row chunked (loop):  {_median_ms(steps(chunked(64)), args, per=20):.3f} ms")


_COLLECTIVES = r"""
import re, sys
sys.path.insert(0, sys.argv[1])
import bench
import jax, jax.numpy as jnp, numpy as np
from qsparse import training, wrap
s = 10
sched = training.Schedule(total_steps=s, prune_begin=3, prune_end=6, prune_every=1)
model = bench.MLP(hidden=bench.SMALL_HIDDEN)
xy = bench.synthetic_batch(128)
plan, _ = bench.joint_plan(model, xy[0])
specs = [training.make_spec(plan.init_spec(w_bits=w, a_bits=a, compression=c),
         learning_rate=1e-3, prox_strength=1e-4) for w, a, c in bench.SWEEP_SETTINGS]
states = [training.init_state(model, plan, sched, sp, jax.random.key(i), xy[0])
          for i, sp in enumerate(specs)]
step = training.make_train_step(model, plan, sched)
run = lambda st, b, sp: jax.lax.scan(lambda a, _: step(a, b, sp), st, None, length=s)[0]
mesh, per, rep = bench.settings_mesh(len(specs))
stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
args = jax.device_put((stacked, wrap.stack_specs(specs)), per)
args = (args[0], jax.device_put(xy, rep), args[1])
gspmd = jax.jit(
    jax.vmap(run, in_axes=(0, None, 0)), in_shardings=(per, rep, per), out_shardings=per
)
mapped = jax.jit(training.over_settings(run, mesh, (True, False, True), "vmap"))
for name, f in (("jit-sharded global vmap", gspmd), ("shard_map (over_settings)", mapped)):
    hlo = f.lower(*args).compile().as_text()
    n = len(re.findall(r" all-reduce\(", hlo))
    print(f"{name:27s} devices {mesh.devices.size}: all-reduce ops {n}")
"""

_PLAIN = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import bench, jax, numpy as np
xy = bench.synthetic_batch(128)
step, state, _ = bench.plain_setup(bench.BIG_HIDDEN, xy[0])
run = bench.scan_steps(step, 20)
jax.block_until_ready(run(state, xy))
ts = []
for _ in range(9):
    t = time.perf_counter()
    jax.block_until_ready(run(state, xy))
    ts.append(time.perf_counter() - t)
print(f"{np.median(ts) * 1e3 / 20:.2f}")
"""


def _python(code: str, devices: int | None) -> str:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "scripts")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return out.stdout.strip()


def sweep_collectives() -> None:
    """All-reduce ops in the bench's 8-setting sweep program on one device per core."""
    print(_python(_COLLECTIVES, os.cpu_count() or 1))


def device_flag() -> None:
    """The plain Flax step (MLP 784-1024x3-10, batch 128), in processes with one JAX device and
    with one device per core, alternating: the flag must not slow single-device programs."""
    n = os.cpu_count() or 1
    for _ in range(2):
        one = _python(_PLAIN, None)
        many = _python(_PLAIN, n)
        print(f"plain step ms: 1 device {one} | {n} devices {many}")


_HLO_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$")


def _hlo_frames(hlo: str) -> dict[str, str]:
    """Stack frame id -> ``file:line function`` from the tables of a compiled HLO module."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            tables[section] = {}
        elif section and re.match(r"\d+ ", line):
            key, value = line.split(" ", 1)
            tables[section][key] = value
        elif not line.strip():
            section = None
    files, funcs = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locs = tables.get("FileLocations", {})
    out = {}
    for fid, frame in tables.get("StackFrames", {}).items():
        loc = locs.get(re.search(r"file_location_id=(\d+)", frame).group(1), "")
        m = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", loc)
        if m:
            path = files.get(m.group(1), "").strip('"')
            short = "/".join(path.split("/")[-2:])
            func = funcs.get(m.group(2), "").strip('"').replace(".<locals>", "")
            out[fid] = f"{short}:{m.group(3)} {func}"
    return out


def _hlo_ops(hlo: str) -> dict[str, dict]:
    """Instruction name -> shape, opcode, whether it is a matmul, and its source line."""
    frames = _hlo_frames(hlo)
    comps: dict[str, str] = {}
    for block in re.split(r"\n(?=\S)", hlo):
        head = block.split(" ", 1)[0].lstrip("%")
        comps[head] = block
    ops = {}
    for line in hlo.splitlines():
        m = _HLO_INSTR.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(called.group(1), "") if called else ""
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        ops[name] = {
            "shape": shape,
            "opcode": opcode,
            "matmul": opcode in ("dot", "convolution") or " dot(" in body,
            "source": frames.get(frame.group(1), "") if frame else "",
        }
    return ops


def _union_ms(intervals) -> float:
    """Total length (ms) covered by ``(start_ns, end_ns)`` intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def _op_intervals(events, ops: dict) -> list[tuple[int, int, str]]:
    """``(start_ns, end_ns, name)`` of the XLA ops among traced ``(start_ns, duration_ns, name)``.

    XLA:CPU runs a dot asynchronously on its thread pool: the event named after the op then
    covers only the launch, and an ``end: <op>`` event marks completion, so a matmul ends at
    the first ``end:`` event of its name after it starts (at b1024 a weight-gradient dot
    launches in 0.4 ms and completes 5 ms later). Other ops keep their event's own span: their
    ``end:`` events also wait for whatever else holds the pool, which is not their work.
    """
    import bisect

    ends: dict[str, list[int]] = {}
    for start, _, name in events:
        if name.startswith("end: "):
            ends.setdefault(name[5:], []).append(start)
    for times in ends.values():
        times.sort()
    out = []
    for start, dur, name in events:
        # Control-flow ops (a branch, a loop) are timed around the ops they run: not counted.
        if name not in ops or ops[name]["opcode"] in ("conditional", "while", "call"):
            continue
        end = start + dur
        times = ends.get(name, []) if ops[name]["matmul"] else []
        i = bisect.bisect_left(times, start)
        if i < len(times):
            end = max(end, times[i])
        out.append((start, end, name))
    return out


def _trace_ops(run, args, calls: int) -> tuple[dict, list[tuple[int, int, str]]]:
    """The compiled program's ops (:func:`_hlo_ops`) and ``(start_ns, end_ns, name)`` of every
    XLA op executed during ``calls`` traced calls (after one untraced, warm-up call)."""
    import tempfile

    import jax

    ops = _hlo_ops(run.lower(*args).compile().as_text())
    jax.block_until_ready(run(*args))  # compiled and warm before the trace
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(run(*args))
        (path,) = Path(d).rglob("*.xplane.pb")
        pd = jax.profiler.ProfileData.from_file(str(path))
    events = [
        (ev.start_ns, ev.duration_ns, ev.name)
        for plane in pd.planes
        for line in plane.lines
        for ev in line.events
    ]
    return ops, _op_intervals(events, ops)


def _bench():
    """``scripts/bench.py`` as a module (importing it sets the host device count before JAX
    starts)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    return bench


def _step_programs(batch: int, n: int) -> dict:
    """The bench's plain program and the joint program in each phase: name -> (run, args)."""
    bench = _bench()
    import jax

    from qsparse import training

    model = bench.MLP(hidden=bench.BIG_HIDDEN)
    xy = bench.synthetic_batch(batch)
    sched = bench.STEP_SCHEDULE
    p_step, p_state, _ = bench.plain_setup(bench.BIG_HIDDEN, xy[0])
    plan, spec = bench.joint_plan(model, xy[0])
    j_state = training.init_state(model, plan, sched, spec, jax.random.key(0), xy[0])
    p_run = bench.scan_steps(p_step, n)
    j_run = bench.scan_steps(training.make_train_step(model, plan, sched), n)
    programs = {"plain": (p_run, (p_state, xy))}
    for phase, st in bench.phase_states(j_state, sched).items():
        programs[f"joint {phase}"] = (j_run, (st, xy, spec))
    return programs


def _step_calls(batch: int, n: int, names=("plain", "joint prox")) -> dict:
    """Zero-argument callables of the named :func:`_step_programs`, for ``bench.race``."""
    built = _step_programs(batch, n)
    return {k: (lambda run=built[k][0], args=built[k][1]: run(*args)) for k in names}


def step_profile(batch: int = 128, n: int = 10, calls: int = 5) -> None:
    """Where a step's time goes: plain Flax against the joint step in each phase.

    Traces the bench's programs (MLP 784-1024x3-10, ``n`` steps per call) with
    ``jax.profiler`` and splits each step into XLA ops: their summed time, how much of it
    ran concurrently (summed / wall), matmul time, and the wall time during which no matmul
    was in flight (the elementwise work nothing overlaps: optimizer, quantizer backward,
    prox). Then the non-matmul op time by the source line XLA records for each op.
    """

    programs = _step_programs(batch, n)
    print(f"batch {batch}, {n} steps per call, {calls} calls traced; per step:")
    print(f"{'program':15s} {'wall ms':>8s} {'op ms':>7s} {'overlap':>7s} {'matmul':>7s}"
          f" {'no-matmul wall':>14s}")  # fmt: skip
    by_source: dict[str, dict[str, float]] = {}
    for name, (run, args) in programs.items():
        ops, evs = _trace_ops(run, args, calls)
        steps = calls * n
        op_ms = sum(b - a for a, b, _ in evs) / 1e6 / steps
        mm = [(a, b) for a, b, k in evs if ops[k]["matmul"]]
        mm_ms = sum(b - a for a, b in mm) / 1e6 / steps
        # Traced calls follow one another, so the span of their ops is the wall time.
        window = (max(b for _, b, _ in evs) - min(a for a, _, _ in evs)) / 1e6
        wall = window / steps
        free = (window - _union_ms(mm)) / steps
        print(f"{name:15s} {wall:8.2f} {op_ms:7.2f} {op_ms / wall:7.2f} {mm_ms:7.2f} {free:14.2f}")
        for a, b, k in evs:
            if not ops[k]["matmul"]:
                row = by_source.setdefault(ops[k]["source"] or "(no source)", {})
                row[name] = row.get(name, 0.0) + (b - a) / 1e6 / steps
    names = list(programs)
    print("\nnon-matmul op time by source line, ms per step (largest first):")
    print(" ".join(f"{k.replace('joint ', ''):>8s}" for k in names) + "  source")
    top = sorted(by_source.items(), key=lambda kv: -max(kv[1].values()))[:12]
    for src, row in top:
        print(" ".join(f"{row.get(k, 0.0):8.2f}" for k in names) + f"  {src}")


def step_timeline(batch: int = 128, n: int = 10, min_us: float = 20.0) -> None:
    """The ops of one step of the plain and the joint fine-tuning program, in start order.

    One traced call of ``n`` steps; the middle step's ops of at least ``min_us``, each with
    its start (ms from the step's first op), duration, whether it is a matmul, its output
    shape and source line: which elementwise work runs beside a matmul, and which after.
    """

    programs = _step_programs(batch, n)
    for name in ("plain", "joint finetune"):
        run, args = programs[name]
        ops, evs = _trace_ops(run, args, 1)
        evs.sort()
        per = len(evs) // n  # every step runs the same ops
        step = evs[per * (n // 2) : per * (n // 2 + 1)]
        t0 = step[0][0]
        print(f"{name}, batch {batch}: step {n // 2} of {n}, ops of {min_us:.0f} us or more")
        print(f"{'start ms':>8s} {'ms':>6s} {'':2s} {'op':28s} {'shape':24s} source")
        for a, b, k in step:
            if (b - a) / 1e3 >= min_us:
                mm = "MM" if ops[k]["matmul"] else ""
                shape = ops[k]["shape"].split("{")[0]
                print(f"{(a - t0) / 1e6:8.2f} {(b - a) / 1e6:6.2f} {mm:2s} {k[:28]:28s}"
                      f" {shape[:24]:24s} {ops[k]['source']}")  # fmt: skip


def page_cost(mib: int = 28, reps: int = 15) -> None:
    """What a fresh page costs: a new anonymous ``mib`` MiB mapping each time (as a call's
    buffers get when the allocator has handed their pages back), one write per 4 KiB page."""
    import mmap

    import numpy as np

    size = mib * 2**20
    us = []
    for _ in range(reps):
        with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as m:
            a = np.frombuffer(m, np.float32)
            t = time.perf_counter()
            a[::1024] = 1.0
            us.append((time.perf_counter() - t) / (size // 4096) * 1e6)
            del a
    print(f"{mib} MiB of fresh pages: {np.median(us):.2f} us per page (best {min(us):.2f})")


def step_windows(reps: int = 7) -> None:
    """The bench's step ratios with its scan lengths before commit e62ac65 (20 steps per call
    at batch 128, 4 at 1024) and with 3x / 4x longer ones, all in one round-robin race per
    batch size, with the minor page faults per call: a call's fresh buffers cost the same
    whatever its length, so they weigh less per step in a longer scan."""
    import numpy as np

    bench = _bench()
    for batch, lengths in ((128, (20, 60)), (1024, (4, 16))):
        progs = {}
        for n in lengths:
            calls = _step_calls(batch, n, ("plain", "joint prox", "joint finetune"))
            progs.update({f"{n}/{k}": f for k, f in calls.items()})
        t = bench.race(progs, reps, tag=f"windows b{batch}/")
        print(f"batch {batch}: ms per step, ratio to plain (median over {reps} rounds),"
              " minor page faults per call")  # fmt: skip
        for n in lengths:
            plain = t[f"{n}/plain"]
            for k in ("plain", "joint prox", "joint finetune"):
                row = t[f"{n}/{k}"]
                flt = int(np.median(bench.FAULTS[f"windows b{batch}/{n}/{k}"]))
                print(f"  {n:3d} steps/call {k:15s} {np.median(row) / n * 1e3:7.2f} ms"
                      f"  {bench.paired_ratio(row, plain):.3f}  {flt:6d}")  # fmt: skip


def memory_state(reps: int = 9, n: int = 40) -> None:
    """The bench's batch-128 prox ratio beside the machine's streaming bandwidth from DRAM
    (16 MB arrays) and from the last-level cache (2 MB arrays), all in one round-robin race:
    run it several times to see the ratio follow the memory system's state."""
    import numpy as np

    bench = _bench()
    progs = _step_calls(128, n)
    progs["dram"] = bench.stream_program()
    elems, passes = 2**19, 64
    progs["cache"] = bench.stream_program(elems, passes)
    t = bench.race(progs, reps)
    p, j = np.array(t["plain"]), np.array(t["joint prox"])
    dram = bench.STREAM_BYTES / np.median(t["dram"]) / 1e9
    cache = bench.stream_bytes(elems, passes) / np.median(t["cache"]) / 1e9
    ratio = bench.paired_ratio(j, p)
    print(f"plain {np.median(p) / n * 1e3:.2f} ms, prox {np.median(j) / n * 1e3:.2f} ms,"
          f" ratio {ratio:.3f} | DRAM {dram:.0f} GB/s | cache {cache:.0f} GB/s")  # fmt: skip


def ratio_drift(rounds: int = 150, block: int | None = None, n: int = 40) -> None:
    """The bench's batch-128 prox ratio over a long race (about 90 s at 150 rounds), as medians
    of consecutive blocks of ``block`` rounds (default: the bench's round count at batch 128):
    how much of a bench run's verdict is the few seconds it happened to run in."""
    import numpy as np

    bench = _bench()
    block = block or bench.SIZES["full"].step_reps[128]
    progs = _step_calls(128, n)
    t0 = time.perf_counter()
    t = bench.race(progs, rounds)
    secs = time.perf_counter() - t0
    p, j = np.array(t["plain"]), np.array(t["joint prox"])
    r = j / p
    cap = bench.STEP_RATIO_TARGET
    print(f"{rounds} rounds in {secs:.0f} s: prox ratio median {np.median(r):.3f};"
          f" rounds above {cap}: {np.mean(r > cap):.0%}")  # fmt: skip
    print(f"medians of blocks of {block} rounds (ratio, plain ms per step):")
    for i in range(0, rounds - block + 1, block):
        blk = slice(i, i + block)
        print(f"  rounds {i:3d}-{i + block - 1:3d}  {np.median(r[blk]):.3f}"
              f"  {np.median(p[blk]) / n * 1e3:6.2f}")  # fmt: skip


def mask_forms(rounds: int = 40) -> None:
    """Adam's first-moment update over 4096x1024 arrays with the weight quantizer's
    straight-through mask (weights in range and not pruned), written with compares and a
    select and written as 0/1 factors (``quant._le``, ``quant._nonzero``, as the quantizer's
    backward pass now computes it), each as a time ratio to the same update with no mask."""
    import jax
    import jax.numpy as jnp

    from qsparse import quant

    bench = _bench()
    k = jax.random.split(jax.random.key(0), 3)
    shape = (4096, 1024)
    g = 1e-3 * jax.random.normal(k[0], shape)
    m = 1e-4 * jax.random.normal(k[1], shape)
    w = 0.05 * jax.random.normal(k[2], shape)
    w = w.at[::5].set(0.0)  # pruned rows
    s, lim, b1 = jnp.float32(0.05), jnp.float32(1.0), 0.9

    def no_mask(g, m, w):
        return (1 - b1) * g + b1 * m + 0.0 * w

    def select(g, m, w):
        keep = (w != 0) & (jnp.abs(w * (1.0 / s)) <= lim)
        return (1 - b1) * jnp.where(keep, g, 0.0) + b1 * m

    def factors(g, m, w):
        keep = quant._nonzero(w) * quant._le(jnp.abs(w * (1.0 / s)), lim)
        return (1 - b1) * (g * keep) + b1 * m

    fns = {k: jax.jit(f) for k, f in (("none", no_mask), ("select", select), ("0/1", factors))}
    a, b = fns["select"](g, m, w), fns["0/1"](g, m, w)
    print(f"select and 0/1 forms equal element for element: {bool((a == b).all())}")
    t = bench.race({k: (lambda f=f: f(g, m, w)) for k, f in fns.items()}, rounds)
    for name in ("select", "0/1"):
        ratio = bench.paired_ratio(t[name], t["none"])
        print(
            f"{name:>7s} mask: {1e3 * bench.med(t[name]):.3f} ms, {ratio:.2f}x the unmasked update"
        )
    print(f"   none: {1e3 * bench.med(t['none']):.3f} ms ({rounds} rounds, median)")


def input_order(rounds: int = 25) -> None:
    """The bench's input comparison (Fashion-MNIST, MLP 784-256-256-10, batch 128) with two
    more epochs: shuffled without ``get_batch``'s prefetch, and in index order. Prints each
    epoch's constant-batch ratio, then the batch gathers alone: ``get_batch`` with and without
    its prefetch, pixel-major and ``images[idx]`` on the 4-D array, each under a sum and under
    a matmul, beside a slice of consecutive rows."""
    import jax
    import jax.numpy as jnp

    from qsparse import data as qdata

    bench = _bench()
    su = bench.input_setup()
    images, labels, state, spec = su["images"], su["labels"], su["state"], su["spec"]
    epoch, step, const, fixed = su["epoch"], su["step"], su["const"], su["fixed"]
    batch, steps = su["batch"], su["steps"]
    in_order = jnp.arange(steps * batch, dtype=jnp.int32).reshape(steps, batch)

    @functools.partial(jax.jit, static_argnames="prefetch")
    def scanned(state, images, labels, perm, spec, prefetch=True):
        def body(st, idx):
            return step(st, qdata.get_batch(images, labels, idx, prefetch=prefetch), spec)

        return jax.lax.scan(body, state, perm)

    keys = iter(jax.random.split(jax.random.key(1), 10 * rounds + 10))
    shuffle = jax.jit(lambda k: qdata.epoch_indices(k, len(labels), batch))

    def fresh_perm():
        return shuffle(next(keys))

    epochs = {
        "shuffled": lambda: epoch(state, images, labels, next(keys), spec),
        "shuffled, no prefetch": lambda: scanned(
            state, images, labels, fresh_perm(), spec, prefetch=False
        ),
        "in order": lambda: scanned(state, images, labels, in_order, spec),
    }
    t = bench.race({**epochs, "constant": lambda: const(state, fixed, spec)}, rounds)
    for name in epochs:
        print(
            f"{name:>21s} epoch {bench.med(t[name]):.3f} s; constant-batch ÷ epoch"
            f" {bench.paired_ratio(t['constant'], t[name]):.3f} ({rounds} rounds)"
        )

    # The gathers alone over one shuffled epoch's batches, under two consumers: a sum (the only
    # one this probe had until commit 162c59a) and a matmul with a 784x16 matrix, as the first
    # layer reads the batch; beside consecutive rows sliced in order. XLA compiles the
    # pixel-major form, (pixels, examples) transposed back, into the same example-major
    # gather. Only under the sum does the form matter: the 4-D `images[idx]` then fuses into
    # the reduction as a slow loop (the ~300 us a step that commit bdd3971 set out to cure).
    perm = qdata.epoch_indices(jax.random.key(2), len(labels), batch)
    w = jax.random.normal(jax.random.key(3), (784, 16))
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(0,), collapsed_slice_dims=(0,), start_index_map=(0,)
    )

    def pixel_major(im, idx):
        flat = im.reshape(im.shape[0], -1)
        cols = jax.lax.gather(flat, idx.reshape(-1, 1), dims, slice_sizes=(1, flat.shape[1]))
        return qdata.normalize(cols.T)

    def consecutive(im, idx):
        # idx is a row of `in_order`: the batch's rows are consecutive, read as one slice
        flat = im.reshape(im.shape[0], -1)
        return qdata.normalize(jax.lax.dynamic_slice_in_dim(flat, idx[0], batch))

    def get_batch(prefetch):
        def get(im, idx):
            return qdata.get_batch(im, labels, idx, prefetch=prefetch)[0].reshape(batch, -1)

        return get

    gets = {
        "get_batch": get_batch(True),
        "no prefetch": get_batch(False),
        "pixel-major": pixel_major,
        "images[idx]": lambda im, idx: qdata.normalize(im[idx]).reshape(batch, -1),
        "slice in order": consecutive,
    }
    consumers = {"sum": jnp.sum, "matmul": lambda x: jnp.sum(x @ w)}

    def program(get, use):
        @jax.jit
        def run(images, perm):
            def body(c, idx):
                return c + use(get(images, idx)), None

            return jax.lax.scan(body, jnp.float32(0), perm)[0]

        return run

    runs, kept = {}, {}
    for gname, get in gets.items():
        for cname, use in consumers.items():
            run = program(get, use)
            p = in_order if gname == "slice in order" else perm
            hlo = run.lower(images, p).compile().as_text()
            shapes = re.findall(r"= u8\[([\d,]+)\][^ ]* gather\(", hlo)
            kept[(gname, cname)] = ", ".join(f"u8[{x}]" for x in shapes) or "none"
            runs[(gname, cname)] = lambda run=run, p=p: run(images, p)
    g = bench.race({f"{k[0]}/{k[1]}": f for k, f in runs.items()}, rounds)
    print(f"\nshuffled batches: gather + normalize + consumer, us/step ({rounds} rounds, median)")
    for (gname, cname), _ in runs.items():
        us = 1e6 * bench.med(g[f"{gname}/{cname}"]) / steps
        print(f"{gname:>15s} + {cname:6s} {us:6.0f}  (compiled gathers: {kept[(gname, cname)]})")


PROBES = {
    "chunked-adam": chunked_adam,
    "step-profile": step_profile,
    "step-timeline": step_timeline,
    "sweep-collectives": sweep_collectives,
    "device-flag": device_flag,
    "page-cost": page_cost,
    "step-windows": step_windows,
    "memory-state": memory_state,
    "ratio-drift": ratio_drift,
    "mask-forms": mask_forms,
    "input-order": input_order,
}


def main(argv=None) -> int:
    """Runs the named probes.

    Args:
      argv: command-line arguments (probe names).

    Returns:
      The exit status.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probes", nargs="+", choices=sorted(PROBES))
    args = p.parse_args(argv)
    for name in args.probes:
        print(f"== {name}")
        PROBES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
