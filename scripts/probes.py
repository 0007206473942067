r"""Small performance probes behind statements in the README's Performance section.

    python scripts/probes.py chunked-adam        # Adam on a 1024^2 kernel: fused vs row-chunked
    python scripts/probes.py sweep-collectives   # all-reduces in a jit-sharded vmap vs shard_map
    python scripts/probes.py device-flag         # plain step with and without one device per core

Each prints its numbers; none is a test. ``sweep-collectives`` and ``device-flag`` start
subprocesses, because the host device count is fixed when JAX starts.
"""

from __future__ import annotations

import argparse
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


PROBES = {
    "chunked-adam": chunked_adam,
    "sweep-collectives": sweep_collectives,
    "device-flag": device_flag,
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
