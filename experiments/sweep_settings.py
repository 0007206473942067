"""A sweep's settings: the grid's points, their validation, and the chunks they train in.

A sweep config's ``sweep`` block names grids (``w_bits``, ``a_bits``, ``compression``,
``seeds``, optionally ``learning_rate``, ``prox_strength``) and model variants (``models``);
every point of their product is a :class:`Setting`. ``bit_pairs`` (optional, a list of
``[w_bits, a_bits]``) replaces the product of ``w_bits`` and ``a_bits`` with those pairs.
Settings of one model shape train together, ``sweep.chunk_size`` at a time
(:func:`make_chunks`). ``experiments.sweep`` re-exports the public names.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

VECTORIZE = ("vmap", "map")
VARIANT_KEYS = ("name", "hidden", "arch", "channels", "w_bits", "a_bits", "compression")
GRID_KEYS = ("w_bits", "a_bits", "compression")

# ---------------------------------------------------------------------------------------------
# Settings and chunks.


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep grid.

    Attributes:
      id: index in the sweep's enumeration order (stable for a given config).
      model: the model variant's name.
      arch: ``config.model.name`` (``"mlp"``, ``"lenet"``, ``"vgg"``).
      hidden: hidden widths.
      channels: conv channels (unused by MLPs).
      w_bits: weight bits.
      a_bits: activation bits.
      compression: block compression ratio.
      seed: run seed (parameters and data order).
      learning_rate: peak learning rate.
      prox_strength: block-lasso strength.
    """

    id: int
    model: str
    arch: str
    hidden: tuple[int, ...]
    channels: tuple[int, ...]
    w_bits: int
    a_bits: int
    compression: float
    seed: int
    learning_rate: float
    prox_strength: float

    @property
    def shape(self) -> tuple:
        """What fixes the compiled program: settings with equal shapes train together."""
        return (self.arch, self.hidden, self.channels)

    def spec_values(self) -> dict:
        """The overrides for ``common.make_spec``."""
        return {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "compression": self.compression,
            "learning_rate": self.learning_rate,
            "prox_strength": self.prox_strength,
        }


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Settings of one model shape that train together in one call of the chunk program.

    Attributes:
      index: chunk number (checkpoint directory ``chunk_{index}``).
      ids: setting ids, padding included (the last real id repeated).
      num_real: how many of ``ids`` are real (the rest is padding, dropped from results).
    """

    index: int
    ids: tuple[int, ...]
    num_real: int


def _as_dict(v) -> dict:
    return v.to_dict() if hasattr(v, "to_dict") else dict(v)


def _variants(config) -> list[dict]:
    """Model variants of a sweep config (the base model when ``sweep.models`` is empty)."""
    models = [_as_dict(m) for m in config.sweep.get("models", None) or []]
    if not models:
        hidden = list(config.model.hidden)
        models = [{"name": f"{config.model.name}-{'-'.join(map(str, hidden))}", "hidden": hidden}]
    return models


def validate_sweep(config) -> None:
    """Checks the sweep block and every setting's config; nothing is computed or read.

    Grid values are checked by the library's rule for a setting's values
    (:func:`qsparse.settings.check_setting`, through ``common.check_setting_value``).

    Args:
      config: the sweep config.

    Raises:
      common.ConfigError: one line naming the field, the value and what is allowed.
    """
    from experiments import common

    if "sweep" not in config:
        raise common.ConfigError("sweep is missing: a sweep config needs a 'sweep' block")
    sw = config.sweep
    for key in ("w_bits", "a_bits", "compression", "seeds", "chunk_size"):
        if key not in sw:
            raise common.ConfigError(f"sweep.{key} is missing: a sweep config needs it")
    for key in GRID_KEYS:
        _check_grid(f"sweep.{key}", sw[key], key)
    _bit_pairs(sw)
    for i, seed in enumerate(_number_list("sweep.seeds", sw.seeds)):
        ok = float(seed) == int(seed) and seed >= 0
        _check(ok, f"sweep.seeds[{i}]", seed, "use an integer >= 0")
    for key in ("learning_rate", "prox_strength"):
        if list(sw.get(key, None) or []):  # empty: the config's value
            _check_grid(f"sweep.{key}", sw[key], key)
    chunk = sw.chunk_size
    ok = isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1
    _check(ok, "sweep.chunk_size", chunk, "use an integer >= 1")
    vec = sw.get("vectorize", "vmap")
    _check(vec in VECTORIZE, "sweep.vectorize", vec, f"use one of {VECTORIZE}")
    no_teacher = "use 0 in a sweep (a teacher per setting is not supported)"
    _check(config.distill.weight == 0, "distill.weight", config.distill.weight, no_teacher)
    recal = config.get("recalibrate_batches", 0)
    _check(recal == 0, "recalibrate_batches", recal, "use 0 in a sweep (train runs support it)")
    _check_variants(config)
    # Every distinct setting config must pass the single-run checks (e.g. compression > 1
    # needs a block shape); the checks are cheap, so run them all before any data is read.
    seen = set()
    for s in enumerate_settings(config):
        key = (s.shape, s.w_bits, s.a_bits, s.compression, s.learning_rate, s.prox_strength)
        if key not in seen:
            seen.add(key)
            common.validate(setting_config(config, s))


def _check(cond: bool, field: str, value, allowed: str) -> None:
    from experiments import common

    if not cond:
        raise common.ConfigError(f"{field}={value!r} is not allowed: {allowed}")


def _number_list(field: str, values) -> list:
    """``values`` as a list, checked to be non-empty, numbers, each once."""
    values = list(values) if isinstance(values, (list, tuple)) else values
    numbers = isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    )
    _check(numbers and len(values) > 0, field, values, "use a non-empty list of numbers")
    _check(len(set(values)) == len(values), field, values, "use each value once")
    return values


def _check_grid(field: str, values, kind: str) -> None:
    """A grid of one setting value (``kind``: a ``qsparse.settings.FIELDS`` name)."""
    from experiments import common

    for i, v in enumerate(_number_list(field, values)):
        common.check_setting_value(kind, f"{field}[{i}]", v)


def _check_variants(config) -> None:
    """The model variants: known keys, unique names, positive widths, valid own grids."""
    names = set()
    paired = bool(_bit_pairs(config.sweep))
    for i, m in enumerate(_variants(config)):
        field = f"sweep.models[{i}]"
        for key in sorted(set(m) - set(VARIANT_KEYS)):
            _check(False, f"{field}.{key}", m[key], f"use only the keys {VARIANT_KEYS}")
        name = m.get("name")
        _check(isinstance(name, str) and name, f"{field}.name", name, "use a non-empty string")
        _check(name not in names, f"{field}.name", name, "use a name no other variant has")
        names.add(name)
        hidden = m.get("hidden")
        _check(
            isinstance(hidden, (list, tuple)) and all(isinstance(h, int) and h > 0 for h in hidden),
            f"{field}.hidden",
            hidden,
            "use a list of positive integers",
        )
        for key in GRID_KEYS:
            if key in m:
                _check_grid(f"{field}.{key}", m[key], key)
        for key in ("w_bits", "a_bits"):
            ok = not (paired and key in m)
            _check(ok, f"{field}.{key}", m.get(key), "leave it out: sweep.bit_pairs is set")


def _bit_pairs(sw) -> list[tuple[int, int]]:
    """``sweep.bit_pairs`` checked: ``[w_bits, a_bits]`` pairs, each once ([] when unset)."""
    from experiments import common

    pairs = sw.get("bit_pairs", None) or []
    ok = isinstance(pairs, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs
    )
    _check(ok, "sweep.bit_pairs", pairs, "use a list of [w_bits, a_bits] pairs")
    for i, (w, a) in enumerate(pairs):
        common.check_setting_value("w_bits", f"sweep.bit_pairs[{i}][0]", w)
        common.check_setting_value("a_bits", f"sweep.bit_pairs[{i}][1]", a)
    out = [(int(w), int(a)) for w, a in pairs]
    _check(len(set(out)) == len(out), "sweep.bit_pairs", pairs, "use each pair once")
    return out


def plan_setting(settings, s):
    """The setting whose config builds the plan of ``s``'s shape: the one with the fewest
    activation bits, so every layer whose input any setting quantizes has its quantizer (a
    rule at 32 bits has none; settings at 32 bits run it as the identity)."""
    return min((t for t in settings if t.shape == s.shape), key=lambda t: t.a_bits)


def enumerate_settings(config) -> list[Setting]:
    """All settings of a sweep config, in a fixed order (their ids).

    Order: model variant, then ``w_bits``, ``a_bits`` (or ``bit_pairs``), ``compression``,
    ``learning_rate``, ``prox_strength``, ``seeds`` (the last varies fastest).

    Args:
      config: the sweep config.

    Returns:
      The settings.
    """
    sw = config.sweep
    lrs = list(sw.get("learning_rate", None) or []) or [config.learning_rate]
    proxes = list(sw.get("prox_strength", None) or []) or [config.sparsity.prox_strength]
    pairs = _bit_pairs(sw)
    out = []
    for m in _variants(config):
        bits = pairs or list(itertools.product(*(m.get(k, sw[k]) for k in ("w_bits", "a_bits"))))
        comps = list(m.get("compression", sw.compression))
        for (w, a), c, lr, prox, seed in itertools.product(
            bits, comps, lrs, proxes, list(sw.seeds)
        ):
            out.append(
                Setting(
                    id=len(out),
                    model=str(m["name"]),
                    arch=str(m.get("arch", config.model.name)),
                    hidden=tuple(int(h) for h in m["hidden"]),
                    channels=tuple(int(h) for h in m.get("channels", config.model.channels)),
                    w_bits=int(w),
                    a_bits=int(a),
                    compression=float(c),
                    seed=int(seed),
                    learning_rate=float(lr),
                    prox_strength=float(prox),
                )
            )
    return out


def setting_config(config, setting: Setting):
    """The single-run config of one setting (what ``experiments.train`` would run).

    Args:
      config: the sweep config.
      setting: the setting.

    Returns:
      A ConfigDict without the ``sweep`` block.
    """
    import ml_collections

    d = config.to_dict()
    d.pop("sweep", None)
    c = ml_collections.ConfigDict(d)
    c.model.name = setting.arch
    c.model.hidden = list(setting.hidden)
    c.model.channels = list(setting.channels)
    c.quant.w_bits = setting.w_bits
    c.quant.a_bits = setting.a_bits
    c.sparsity.compression = setting.compression
    c.learning_rate = setting.learning_rate
    c.sparsity.prox_strength = setting.prox_strength
    c.seed = setting.seed
    return c


def make_chunks(settings: Sequence[Setting], chunk_size: int, num_devices: int) -> list[Chunk]:
    """Splits settings into chunks of one model shape each.

    The chunk size is rounded up to a multiple of ``num_devices`` (each device takes an equal
    slice) and, for a shape with fewer settings than that, cut to the fewest device multiples
    that hold them (no compute spent on padding). All chunks of a shape have the same size,
    so they share one compilation; the last one is padded with copies of its last setting.

    Args:
      settings: from :func:`enumerate_settings`.
      chunk_size: the requested settings per chunk.
      num_devices: devices the setting axis is sharded over.

    Returns:
      The chunks, shapes in order of first appearance.
    """
    groups: dict[tuple, list[Setting]] = {}
    for s in settings:
        groups.setdefault(s.shape, []).append(s)
    size = -(-chunk_size // num_devices) * num_devices
    chunks = []
    for group in groups.values():
        n = min(size, -(-len(group) // num_devices) * num_devices)
        for start in range(0, len(group), n):
            ids = [s.id for s in group[start : start + n]]
            real = len(ids)
            ids += [ids[-1]] * (n - real)
            chunks.append(Chunk(index=len(chunks), ids=tuple(ids), num_real=real))
    return chunks


def _layout_json(chunks: Sequence[Chunk]) -> list[dict]:
    return [{"chunk": c.index, "ids": list(c.ids), "num_real": c.num_real} for c in chunks]


def load_layout(workdir: Path, chunks: list[Chunk], num_devices: int) -> list[Chunk]:
    """The chunk layout of this workdir: the saved one when resuming, else ``chunks`` (saved).

    A resumed sweep keeps the layout it started with, so finished chunks and checkpoints stay
    valid when the chunk size would now round differently.
    """
    from experiments import common

    path = workdir / "chunks.json"
    if not path.exists():
        common.write_json(path, _layout_json(chunks))
        return chunks
    saved = [
        Chunk(int(c["chunk"]), tuple(int(i) for i in c["ids"]), int(c["num_real"]))
        for c in json.loads(path.read_text())
    ]
    bad = [c.index for c in saved if len(c.ids) % num_devices]
    if bad:
        raise common.ConfigError(
            f"workdir={str(workdir)!r} was started with chunks of {len(saved[bad[0]].ids)} "
            f"settings, which {num_devices} devices cannot share evenly: resume on the device "
            "count it started with, or use --overwrite"
        )
    return saved
