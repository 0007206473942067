"""training.over_settings: settings split over devices, each device batching its own."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Pruning updates at per-setting step counts: 10 and 20 are on the mask schedule, 11-13 off it.
# Each device's schedule branch looks at its own settings only, so with two devices the second
# device (counts 12, 13) may skip the branch while the first takes it; every setting must still
# get exactly what it gets alone.
_CHECK = r"""
import sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from qsparse import optim, training

mode, counts = sys.argv[1], [int(c) for c in sys.argv[2].split(",")]
tx = optim.gradual_block_pruning({"a": (4, 4)}, 4.0, begin=0, end=20, frequency=10)
params = {"a": jax.random.normal(jax.random.key(0), (16, 8))}
g = {"a": jax.random.normal(jax.random.key(1), (16, 8))}

def one(count, g):
    state = tx.init(params)._replace(count=count)
    return tx.update(g, state, params)

mesh = Mesh(np.array(jax.devices()), ("settings",))
batched = jax.jit(training.over_settings(one, mesh, (True, False), mode))
c = jax.device_put(jnp.array(counts, jnp.int32), NamedSharding(mesh, P("settings")))
got = batched(c, g)
assert len(got[1].masks["a"].sharding.device_set) == len(jax.devices())
for i, n in enumerate(counts):
    want = jax.jit(one)(jnp.asarray(n, jnp.int32), g)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))
kept = np.asarray(got[1].masks["a"]).reshape(len(counts), -1).sum(1)
# No step of a device waits on another: no cross-device reduction in the program, where one
# global vmap sharded by jit needs an all-reduce for the "any setting" branch predicate.
per, rep = NamedSharding(mesh, P("settings")), NamedSharding(mesh, P())
ours = batched.lower(c, g).compile().as_text().count(" all-reduce(")
glob = jax.jit(jax.vmap(one, in_axes=(0, None)), in_shardings=(per, rep)).lower(c, g)
print(" ".join(str(int(k)) for k in kept), ours, glob.compile().as_text().count(" all-reduce("))
"""


def _run(mode: str, counts: str, devices: int) -> list[int]:
    """Masks' kept blocks per setting, then all-reduce ops in ours and in a jit-sharded vmap."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", _CHECK, mode, counts],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [int(k) for k in out.stdout.split()]


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_each_setting_gets_what_it_gets_alone_on_two_devices(mode):
    *kept, ours, global_vmap = _run(mode, "10,11,12,13", devices=2)
    # The on-schedule setting pruned; the off-schedule ones (one beside it on device 0, two
    # on device 1) kept all 8 blocks of their masks.
    assert kept[0] < 8 and kept[1:] == [8, 8, 8]
    assert ours == 0 and global_vmap >= 1


def test_bad_vectorize_is_refused():
    import jax
    from jax.sharding import Mesh

    from qsparse import training

    mesh = Mesh(np.array(jax.devices()[:1]), ("settings",))
    with pytest.raises(ValueError, match="vectorize='pmap'"):
        training.over_settings(lambda x: x, mesh, (True,), "pmap")
