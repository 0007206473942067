"""What train, sweep and export share: config validation, building a run, checkpoints, logs."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from experiments import workdir as workdir_lock
from qsparse import data as qdata
from qsparse import models, quant, sparsity, training, wrap
from qsparse import settings as qsettings


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the field, value and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Validation: every check runs before any data is read or any array is made.


def _check(cond: bool, field: str, value, allowed: str):
    if not cond:
        raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")


def check_setting_value(kind: str, field: str, value) -> None:
    """Checks one setting value held in a config field, by the library's rule for it.

    Args:
      kind: which value (one of ``qsparse.settings.FIELDS``: ``w_bits``, ``a_bits``,
        ``compression``, ``learning_rate``, ``prox_strength``).
      field: the config field that holds it (named in the error).
      value: the value.

    Raises:
      ConfigError: one line naming the field, the value and what is allowed.
    """
    try:
        qsettings.check_setting({kind: value}, {kind: field})
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_override(kind: str, field: str, value, zero: str) -> None:
    """A first or last layer's own value: 0 (meaning ``zero``) or a value the library allows."""
    if value != 0:
        try:
            check_setting_value(kind, field, value)
        except ConfigError as e:
            raise ConfigError(f"{e}; or 0 ({zero})") from None


def validate(config: ml_collections.ConfigDict, *, num_train: int | None = None) -> None:
    """Checks every field a run depends on; raises :class:`ConfigError` on the first bad one.

    Args:
      config: the experiment config.
      num_train: training examples, when known (checks the batch size against it).

    Raises:
      ConfigError: one line naming the field, the value and what is allowed.
    """
    _check(
        config.dataset in qdata.DATASETS, "dataset", config.dataset, f"use one of {qdata.DATASETS}"
    )
    _validate_model(config.model)
    _validate_quant(config.quant)
    _validate_sparsity(config.sparsity)
    _validate_schedule(config, num_train)
    _validate_paths(config)


def _validate_model(m) -> None:
    _check(m.name in models.MODELS, "model.name", m.name, f"use one of {models.MODELS}")
    hidden = tuple(m.hidden)
    _check(
        all(isinstance(h, int) and h > 0 for h in hidden),
        "model.hidden",
        hidden,
        "use positive integers, e.g. --config.model.hidden='(512, 512)'",
    )
    channels = tuple(m.channels)
    if m.name != "mlp":
        _check(
            len(channels) > 0 and all(isinstance(ch, int) and ch > 0 for ch in channels),
            "model.channels",
            channels,
            "use positive integers, e.g. --config.model.channels='(16, 32, 64)'",
        )
    if m.name == "resnet":
        depth = m.get("depth", 8)
        _check(
            models.resnet_blocks(depth, len(channels)) is not None,
            "model.depth",
            depth,
            f"use 2 + 2 * blocks * len(model.channels) with blocks >= 1, e.g."
            f" {2 + 2 * len(channels)} or {2 + 6 * len(channels)}",
        )


def _validate_quant(q) -> None:
    check_setting_value("w_bits", "quant.w_bits", q.w_bits)
    check_setting_value("a_bits", "quant.a_bits", q.a_bits)
    for f, kind, zero in (
        ("first_w_bits", "w_bits", "the same as quant.w_bits"),
        ("last_w_bits", "w_bits", "the same as quant.w_bits"),
        ("first_a_bits", "a_bits", "the data as it is"),
    ):
        _check_override(kind, f"quant.{f}", q[f], zero)
    _check(
        q.scale_mode in quant.SCALE_MODES,
        "quant.scale_mode",
        q.scale_mode,
        f"use one of {quant.SCALE_MODES}",
    )
    _check(q.act_clip > 0, "quant.act_clip", q.act_clip, "use a value > 0")
    _check(q.get("dampen", 0.0) >= 0, "quant.dampen", q.get("dampen", 0.0), "use >= 0 (0 = off)")
    _check(
        q.get("weight_grad", "clipped") in quant.WEIGHT_GRADS,
        "quant.weight_grad",
        q.get("weight_grad", "clipped"),
        f"use one of {quant.WEIGHT_GRADS} (the weight gradient outside the quantizer's range)",
    )
    _check(
        not q.get("bf16_grads", False) or q.get("int_matmul", False),
        "quant.bf16_grads",
        q.get("bf16_grads", False),
        "use False, or set quant.int_matmul=True (the bfloat16 backward multiplies its codes)",
    )
    _check(
        q.get("bias_bits", 32) in quant.BIAS_BITS,
        "quant.bias_bits",
        q.get("bias_bits", 32),
        f"use one of {quant.BIAS_BITS} (8: int8 codes and a float32 scale per layer)",
    )


def _validate_sparsity(s) -> None:
    check_setting_value("compression", "sparsity.compression", s.compression)
    for f in ("first_compression", "last_compression"):
        _check_override("compression", f"sparsity.{f}", s[f], "the same as sparsity.compression")
    for f in ("block_shape", "first_block_shape", "last_block_shape"):
        bs = tuple(s[f])
        _check(
            bs == () or (len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)),
            f"sparsity.{f}",
            bs,
            "use () or two positive integers (bm, bn)",
        )
    if tuple(s.block_shape) == ():
        _check(
            s.compression == 1,
            "sparsity.compression",
            s.compression,
            "block compression needs sparsity.block_shape; use 1 without blocks",
        )
    check_setting_value("prox_strength", "sparsity.prox_strength", s.prox_strength)
    _check(s.scope in ("layer", "global"), "sparsity.scope", s.scope, "use 'layer' or 'global'")
    _check(
        s.balanced in sparsity.BALANCE,
        "sparsity.balanced",
        s.balanced,
        f"use one of {sparsity.BALANCE}",
    )
    _check(s.prune_every_steps >= 1, "sparsity.prune_every_steps", s.prune_every_steps, "use >= 1")


def _validate_schedule(config, num_train: int | None) -> None:
    s = config.sparsity
    _check(
        isinstance(config.num_epochs, int) and config.num_epochs >= 1,
        "num_epochs",
        config.num_epochs,
        "use an integer >= 1",
    )
    _check(
        0 <= s.prune_begin_epoch <= s.prune_end_epoch <= config.num_epochs,
        "sparsity.prune_begin_epoch/prune_end_epoch",
        (s.prune_begin_epoch, s.prune_end_epoch),
        f"need 0 <= begin <= end <= num_epochs={config.num_epochs}",
    )
    _check(
        isinstance(config.batch_size, int) and config.batch_size >= 1,
        "batch_size",
        config.batch_size,
        "use an integer >= 1",
    )
    if num_train is not None:
        _check(
            config.batch_size <= num_train,
            "batch_size",
            config.batch_size,
            f"use at most the {num_train} training examples of {config.dataset}",
        )
        recal = config.get("recalibrate_batches", 0)
        _check(
            not isinstance(recal, int) or recal * config.batch_size <= num_train,
            "recalibrate_batches",
            recal,
            f"use at most {num_train // config.batch_size} (batches of {config.batch_size} in"
            f" the {num_train} training examples of {config.dataset})",
        )
    check_setting_value("learning_rate", "learning_rate", config.learning_rate)
    _check(config.warmup_epochs >= 0, "warmup_epochs", config.warmup_epochs, "use >= 0")
    _check(config.weight_decay >= 0, "weight_decay", config.weight_decay, "use >= 0")
    recal = config.get("recalibrate_batches", 0)
    ok = isinstance(recal, int) and not isinstance(recal, bool) and recal >= 0
    _check(ok, "recalibrate_batches", recal, "use a whole number >= 0 (0 = off)")
    _check(0 <= config.distill.weight <= 1, "distill.weight", config.distill.weight, "use 0..1")
    _check(
        config.checkpoint_every_epochs >= 1,
        "checkpoint_every_epochs",
        config.checkpoint_every_epochs,
        "use >= 1",
    )
    _check(config.keep_checkpoints >= 1, "keep_checkpoints", config.keep_checkpoints, "use >= 1")


def _validate_paths(config) -> None:
    if config.distill.weight > 0:
        _check(
            bool(config.distill.teacher_workdir)
            and (Path(config.distill.teacher_workdir) / "results.json").exists(),
            "distill.teacher_workdir",
            config.distill.teacher_workdir,
            "use the workdir of a finished run (it has results.json)",
        )
    if config.get("init_from"):
        _check(
            (Path(config.init_from) / "results.json").exists(),
            "init_from",
            config.init_from,
            "use the workdir of a finished run (it has results.json)",
        )
    if config.idx_dir:
        _check(
            Path(config.idx_dir).is_dir(),
            "idx_dir",
            config.idx_dir,
            "use an existing directory of IDX files",
        )


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def config_files(cli: str) -> list[str]:
    """The config files a CLI runs: those whose docstring shows ``python -m experiments.CLI``.

    Args:
      cli: ``"train"`` or ``"sweep"``.

    Returns:
      Their paths as a user types them from the current directory, sorted.
    """
    out = []
    for p in sorted(CONFIG_DIR.glob("*.py")):
        if f"python -m experiments.{cli} " in p.read_text():
            rel = os.path.relpath(p)
            out.append(str(p) if rel.startswith("..") else rel)
    return out


def _flag_value(args: list[str], name: str) -> str | None:
    """The last value of ``--name=V`` / ``--name V`` in ``args`` (absl keeps the last one)."""
    value = None
    for i, a in enumerate(args):
        if a == "--":
            break
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _load_config_file(path: str):
    """Imports a config file and returns its ``get_config()`` (what config_flags loads)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_qsparse_checked_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_config_args(argv: list[str], cli: str) -> str | None:
    """Checks a CLI's ``--config`` and ``--config.FIELD`` arguments before absl parses them.

    ml_collections' config_flags loads the file lazily and reports a missing file or an
    unknown field as a chain of tracebacks; this reads the file itself, once, so each problem
    is one line naming the flag, the value and what is allowed.

    Args:
      argv: the command line (``argv[0]`` the program).
      cli: ``"train"`` or ``"sweep"``: which configs to offer.

    Returns:
      The error line (without ``error: ``), or None when the arguments are fine.
    """
    args = list(argv[1:])
    if any(a in HELP_FLAGS for a in args):
        return None
    allowed = f"use one of {', '.join(config_files(cli))}"
    value = _flag_value(args, "config")
    if value is None:
        return f"--config is required: {allowed}"
    path = value.split(":", 1)[0]  # config_flags passes what follows ':' to get_config
    if not path.endswith(".py") or not Path(path).is_file():
        what = "no such file" if not Path(path).exists() else "not a Python config file"
        return f"--config={value}: {what}; {allowed}"
    try:
        config = _load_config_file(path)
    except Exception as e:  # noqa: BLE001 - a broken config file is reported, not traced
        first = (str(e).strip().splitlines() or [""])[0]
        return f"--config={value}: cannot load it ({type(e).__name__}: {first})"
    if cli == "train" and "sweep" in config:
        return (
            f"--config={value} is a sweep config: run it with python -m experiments.sweep, "
            f"or train one of {', '.join(config_files('train'))}"
        )
    for a in args:
        if a == "--":
            break
        for prefix in ("--config.", "--noconfig."):
            if a.startswith(prefix):
                problem = _check_field(config, a[len(prefix) :].split("=", 1)[0])
                if problem:
                    return f"{a}: {problem}"
    return None


def _check_field(config, dotted: str) -> str | None:
    """Why ``dotted`` (e.g. ``quant.w_bits``) names no field of ``config``, or None."""
    import difflib

    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        if "[" in part or "(" in part:
            return None  # an element of a list: config_flags checks it
        here = ".".join(parts[: i + 1])
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{'.'.join(parts[:i])} is a value, not a group of fields"
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
            group = ".".join(parts[:i])
            hint = (
                f"; did you mean {(group + '.' if group else '') + close[0]!r}?"
                if close
                else "; configs/base.py lists the fields"
            )
            return f"no such config field {here!r}{hint}"
        node = node[part]
    return None


def parse_flags(argv, cli: str | None = None):
    """absl flags parser for the CLIs: a bad flag, config file or config field is one line
    naming it and what is allowed, and exit status 2 (no traceback).

    Args:
      argv: the command line.
      cli: ``"train"`` or ``"sweep"`` for a CLI with a ``--config`` flag (its file and
        ``--config.FIELD`` overrides are checked first, see :func:`check_config_args`).

    Returns:
      The arguments left after the flags.
    """
    from absl import flags

    problem = check_config_args(argv, cli) if cli else None
    if problem is None:
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            problem = str(e)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            # config_flags applying an override (e.g. an element past a list's end).
            arg = next((a for a in argv[1:] if a.startswith("--config.")), "--config")
            problem = f"{arg}: {type(e).__name__}: {e}"
    print(f"error: {' '.join(problem.split())}", file=sys.stderr)
    sys.exit(2)


def cli_start(flag_values) -> None:
    """Common start of the CLIs: quiet library logs, and a workdir is required.

    Orbax and TFDS log every file operation at INFO; the CLIs print progress themselves, so
    library logs are shown only with ``--verbosity`` > 0.

    Args:
      flag_values: the parsed absl FLAGS (with ``workdir``).
    """
    from absl import logging as absl_logging

    if flag_values.verbosity <= 0:
        absl_logging.set_verbosity(absl_logging.WARNING)
    if flag_values.workdir is None:
        print("error: --workdir is required", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# Building a run from a config.


@dataclasses.dataclass
class Run:
    """A model, its plan and its data, built from a config.

    Attributes:
      config: the config.
      dataset: the data (numpy, host).
      model: the Linen model.
      plan: the wrapping plan.
      layer_names: wrapped layers in execution order.
      sched: the training schedule.
      steps_per_epoch: optimizer steps per epoch.
    """

    config: ml_collections.ConfigDict
    dataset: qdata.Dataset
    model: Any
    plan: wrap.Plan
    layer_names: list[str]
    sched: training.Schedule
    steps_per_epoch: int


def load_data(config) -> qdata.Dataset:
    """Loads the config's data set.

    Args:
      config: the config.

    Returns:
      The dataset.
    """
    return qdata.load(
        config.dataset, data_dir=config.data_dir or None, idx_dir=config.idx_dir or None
    )


def _layer_settings(config, names: list[str]) -> dict[str, dict]:
    """Per-layer static settings and initial values from the config's first/last overrides."""
    q, s = config.quant, config.sparsity
    out = {}
    for i, name in enumerate(names):
        first, last = i == 0, i == len(names) - 1
        w_bits = q.w_bits
        if first and q.first_w_bits:
            w_bits = q.first_w_bits
        if last and q.last_w_bits:
            w_bits = q.last_w_bits
        block = tuple(s.block_shape)
        comp = s.compression
        if block:
            if first and tuple(s.first_block_shape):
                block = tuple(s.first_block_shape)
            if last and tuple(s.last_block_shape):
                block = tuple(s.last_block_shape)
            if first and s.first_compression:
                comp = s.first_compression
            if last and s.last_compression:
                comp = s.last_compression
        field = "sparsity.block_shape"
        if first and tuple(s.first_block_shape):
            field = "sparsity.first_block_shape"
        if last and tuple(s.last_block_shape):
            field = "sparsity.last_block_shape"
        out[name] = {
            "w_bits": w_bits,
            # The first layer reads the data itself (uint8 / 255): left as it is by default.
            "a_bits": (q.first_a_bits or 32) if first else q.a_bits,
            "compression": float(comp) if block else 1.0,
            "block_shape": block or None,
            "block_field": field,
        }
    return out


def rules_from_config(config, names: list[str]) -> list[wrap.Rule]:
    """One rule per layer (exact names) from the config.

    Args:
      config: the config.
      names: the model's covered layers in execution order.

    Returns:
      The rules.
    """
    q = config.quant
    rules = []
    for name, st in _layer_settings(config, names).items():
        # Integer-code matmuls where the layer is an x @ kernel Dense and its bits fit.
        int_matmul = bool(
            q.get("int_matmul", False)
            and q.scale_mode == "learned"
            and name.split("/")[-1].startswith("Dense")
            and max(st["w_bits"], st["a_bits"]) <= wrap.INT_MATMUL_MAX_BITS
        )
        rules.append(
            wrap.Rule(
                pattern=re.escape(name),
                w_bits=st["w_bits"],
                a_bits=st["a_bits"],
                compression=st["compression"],
                block_shape=st["block_shape"],
                per_channel=q.per_channel,
                scale_mode=q.scale_mode,
                zero_level=q.zero_level,
                weight_grad=q.get("weight_grad", "clipped"),
                act_clip=q.act_clip,
                learn_clip=q.learn_clip,
                int_matmul=int_matmul,
                bf16_grads=int_matmul and bool(q.get("bf16_grads", False)),
                bias_bits=int(q.get("bias_bits", 32)),
            )
        )
    return rules


def build_model(config, num_classes: int):
    """The Linen model the config names.

    Args:
      config: the config.
      num_classes: outputs.

    Returns:
      The module.
    """
    return models.build(
        config.model.name,
        num_classes=num_classes,
        hidden=list(config.model.hidden),
        channels=list(config.model.channels),
        depth=config.model.get("depth", 8),  # runs from before the field had none
    )


def build_plan(config, model, input_shape) -> tuple[wrap.Plan, list[str]]:
    """Traces the model and builds its plan from the config's rules.

    Args:
      config: the config.
      model: the Linen model.
      input_shape: ``(H, W, C)``.

    Returns:
      ``(plan, layer_names)``.

    Raises:
      ConfigError: a block shape does not divide a layer.
    """
    x = jnp.zeros((1, *input_shape), jnp.float32)
    bare = wrap.make_plan(model, [], x)
    names = list(bare.layers)
    for name, st in _layer_settings(config, names).items():
        if st["block_shape"] is None:
            continue
        try:
            sparsity.check_block_shape(
                bare.layers[name].kernel_shape, st["block_shape"], st["block_field"]
            )
        except ValueError as e:
            raise ConfigError(f"{e} (layer {name})") from None
    rules = rules_from_config(config, names)
    return wrap.make_plan(model, rules, x), names


def build_run(config, dataset: qdata.Dataset | None = None) -> Run:
    """Everything static for one config: data, model, plan, schedule.

    Args:
      config: a validated config.
      dataset: already loaded data (else loaded here).

    Returns:
      The :class:`Run`.
    """
    ds = dataset if dataset is not None else load_data(config)
    validate(config, num_train=len(ds.train_x))
    model = build_model(config, ds.num_classes)
    plan, names = build_plan(config, model, ds.input_shape)
    spe = len(ds.train_x) // config.batch_size
    s = config.sparsity
    sched = training.Schedule(
        total_steps=config.num_epochs * spe,
        prune_begin=s.prune_begin_epoch * spe,
        prune_end=s.prune_end_epoch * spe,
        prune_every=s.prune_every_steps,
        warmup_steps=int(config.warmup_epochs * spe),
        balanced=s.balanced,
        scope=s.scope,
        weight_decay=config.weight_decay,
        distill_weight=config.distill.weight,
        distill_temperature=config.distill.temperature,
        dampen=config.quant.get("dampen", 0.0),
    )
    return Run(config, ds, model, plan, names, sched, spe)


def make_spec(run: Run, **values) -> dict:
    """The training spec of a run, with optional overrides of the config's values.

    Args:
      run: the run.
      **values: any of ``w_bits``, ``a_bits``, ``compression``, ``learning_rate``,
        ``prox_strength``; bits and compression are set with the config's first/last rules.

    Returns:
      The spec (float32 scalars).
    """
    c = ml_collections.ConfigDict(run.config.to_dict())
    for k in ("w_bits", "a_bits"):
        if k in values:
            c.quant[k] = values[k]
    if "compression" in values:
        c.sparsity.compression = values["compression"]
    settings = _layer_settings(c, run.layer_names)
    layers = {}
    for name, lp in run.plan.layers.items():
        st = settings[name]
        layers[name] = {
            "w_bits": jnp.asarray(st["w_bits"], jnp.float32),
            "a_bits": jnp.asarray(st["a_bits"] if lp.act_quantized else 32, jnp.float32),
            "compression": jnp.asarray(st["compression"], jnp.float32),
        }
    return training.make_spec(
        layers,
        learning_rate=values.get("learning_rate", c.learning_rate),
        prox_strength=values.get("prox_strength", c.sparsity.prox_strength),
    )


def init_state(run: Run, spec, seed: int):
    """Initial train state of a run.

    Args:
      run: the run.
      spec: its spec.
      seed: the seed (parameters use ``fold_in(key(seed), 0)``).

    Returns:
      A :class:`qsparse.training.TrainState`.
    """
    key = jax.random.fold_in(jax.random.key(seed), 0)
    x = jnp.zeros((1, *run.dataset.input_shape), jnp.float32)
    start = {}
    if run.config.get("init_from"):
        params, model_state = finished_weights(run.config.init_from)
        start = {"params": params, "model_state": model_state}
    try:
        return training.init_state(run.model, run.plan, run.sched, spec, key, x, **start)
    except ValueError as e:
        raise ConfigError(
            f"init_from={run.config.init_from!r} holds another model than this config's: {e}"
        ) from e


@functools.lru_cache(maxsize=4)
def finished_weights(workdir: str):
    """The model parameters and other collections (batch statistics) of a finished run, on
    the host, for ``init_from`` (read once per process).

    Args:
      workdir: the run's directory.

    Returns:
      ``(params, model_state)``.
    """
    _, _, state, _ = restore_run(workdir)
    return jax.device_get((state.params[training.PARAMS], state.model_state))


def epoch_key(seed: int, epoch: int):
    """The data-order key of one epoch: a pure function of (seed, epoch), so resume is exact.

    Args:
      seed: run seed.
      epoch: epoch index.

    Returns:
      A PRNG key.
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


def readable(x, digits: int = 6) -> float:
    """``x`` rounded to ``digits`` significant digits, for results a person reads (NaN and
    infinities stay as they are).

    Args:
      x: a number.
      digits: significant digits kept.

    Returns:
      The float.
    """
    return float(f"{float(x):.{digits}g}")


def readable_row(row: dict, digits: int = 6) -> dict:
    """A dict with its floats rounded by :func:`readable` (ints, bools and text as they are)."""
    return {k: readable(v, digits) if isinstance(v, float) else v for k, v in row.items()}


def result_metrics(run: Run, state, spec, test_accuracy: float) -> dict:
    """The results.json metrics (memory from the trained, pruned weights).

    Bits are ints; accuracy and ratios are rounded for reading (6 significant digits for the
    accuracy, 4 for ratios and fractions).

    Args:
      run: the run.
      state: final train state (unbatched).
      spec: its spec.
      test_accuracy: measured accuracy.

    Returns:
      dict of plain Python numbers: ``block_compression`` is the config's target block
      compression (``sparsity.compression``), ``weight_compression`` FP32 dense weight memory
      over this model's (codes, block index, scales, biases), ``peak_activation_bits`` the
      largest input+output buffer pair of one layer, ``total_activation_bits`` every
      activation buffer, and ``total_memory_bits`` weights + peak activations.
    """
    # Count what is deployed: the quantized kernels (quantization can empty a kept block).
    deployed = run.plan.transform_params(
        state.params[training.PARAMS], state.params[training.QUANT], spec["layers"]
    )
    mem = run.plan.memory(spec["layers"], deployed)
    first = run.layer_names[0]
    return {
        "test_accuracy": readable(test_accuracy),
        "w_bits": int(round(float(spec["layers"][first]["w_bits"]))),
        "a_bits": int(round(float(run.config.quant.a_bits))),
        "block_compression": readable(run.config.sparsity.compression, 4),
        "block_sparsity": readable(mem["block_sparsity"], 4),
        "weight_memory_bits": int(mem["weight_memory_bits"]),
        "fp32_weight_memory_bits": int(mem["fp32_weight_memory_bits"]),
        "weight_compression": readable(
            float(mem["fp32_weight_memory_bits"]) / float(mem["weight_memory_bits"]), 4
        ),
        "codes_bits": int(mem["codes_bits"]),
        "index_bits": int(mem["index_bits"]),
        "scale_bits": int(mem["scale_bits"]),
        "other_bits": int(mem["other_bits"]),
        "peak_activation_bits": int(mem["activation_memory_bits"]),
        "total_activation_bits": int(mem["activation_total_bits"]),
        "total_memory_bits": int(mem["total_memory_bits"]),
        "num_params": int(mem["num_params"]),
    }


# ---------------------------------------------------------------------------------------------
# Workdir: config guard, checkpoints, metric writers.


def config_json(config) -> str:
    """Canonical JSON of a config (sorted keys), for comparing runs."""
    return json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True, indent=1)


def guard_workdir(workdir: Path, config, overwrite: bool) -> None:
    """Refuses a workdir that belongs to a different config, unless ``overwrite``.

    Args:
      workdir: the run's directory.
      config: this run's config.
      overwrite: delete the old run and start again.

    Raises:
      ConfigError: the workdir holds a run of another config.
    """
    saved = workdir / "config.json"
    text = config_json(config)
    if saved.exists() and saved.read_text() != text:
        old = read_saved_config(saved)
        new = json.loads(text)
        diff = sorted(_diff_keys(old, new))
        if not diff:  # only fields added since, at their defaults: the same run
            write_text(saved, text)
        elif not overwrite:
            raise ConfigError(
                f"workdir={str(workdir)!r} holds a run of a different config (differs in "
                f"{', '.join(diff[:3])}): use another --workdir, or --overwrite to replace it"
            )
        else:
            for entry in workdir.iterdir():  # all but the lock this run holds
                if entry.name != workdir_lock.LOCK_NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        write_text(saved, text)


def read_saved_config(path: Path) -> dict:
    """A saved config.json, its older value forms in today's (``sparsity.balanced`` was a bool).

    Args:
      path: the config.json file.

    Returns:
      The config as a dict.
    """
    d = json.loads(Path(path).read_text())
    sp = d.get("sparsity", {})
    if isinstance(sp.get("balanced"), bool):
        sp["balanced"] = sparsity.check_balance(sp["balanced"])
    return d


_ABSENT = object()


@functools.cache
def _base_defaults() -> dict:
    from configs.base import get_base

    return json.loads(config_json(get_base()))


def _diff_keys(a, b, prefix="", base=None):
    """Dotted names where configs ``a`` (saved) and ``b`` differ; a field ``a`` lacks (added to
    the base config since ``a`` was written) that ``b`` holds at its base default is not a
    difference."""
    base = _base_defaults() if base is None else base
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            sub = base.get(k, _ABSENT) if isinstance(base, dict) else _ABSENT
            yield from _diff_keys(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{prefix}{k}.", sub)
    elif a is _ABSENT and b is not _ABSENT and b == base:
        return
    elif a != b:
        yield prefix.rstrip(".")


def checkpoint_manager(directory: Path, keep: int):
    """An Orbax CheckpointManager keeping the last ``keep`` checkpoints (in a run of several
    processes, every process saves its shards of the same checkpoint together).

    Args:
      directory: where checkpoints live.
      keep: how many to keep.

    Returns:
      ``ocp.CheckpointManager``.
    """
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory.absolute(), options=opts)


def save_checkpoint(mgr, step: int, state, meta: dict) -> None:
    """Saves ``state`` and JSON ``meta`` at ``step`` (synchronously: a kill cannot half-write
    a checkpoint that is then taken as complete; Orbax finalises by an atomic rename).

    Args:
      mgr: the manager.
      step: the global step.
      state: a pytree of arrays.
      meta: JSON-serialisable metadata (epoch, history, timing).
    """
    import orbax.checkpoint as ocp

    mgr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    mgr.wait_until_finished()


def restore_checkpoint(mgr, abstract_state, log=logging.warning):
    """Restores the newest readable checkpoint, falling back to older ones if it is damaged.

    Args:
      mgr: the manager.
      abstract_state: a pytree with the state's structure (arrays or ShapeDtypeStructs); a
        leaf's ``sharding``, if it has one, is where its restored array is placed.
      log: where to report a damaged checkpoint.

    Returns:
      ``(step, state, meta)`` or ``None`` when there is no checkpoint.

    Raises:
      RuntimeError: checkpoints exist but none can be read (never silently starts over).
    """
    import orbax.checkpoint as ocp

    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        return None
    # The target's sharding (when the abstract leaves carry one) tells Orbax where to place
    # the arrays: without it a checkpoint saved on another device count cannot be read.
    target = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            if hasattr(x, "shape")
            else x
        ),
        abstract_state,
    )
    for step in steps:
        try:
            out = mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
            state = jax.tree.map(jnp.asarray, out["state"])
            state = jax.tree.unflatten(jax.tree.structure(abstract_state), jax.tree.leaves(state))
            return step, state, dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
            log(
                f"checkpoint {step} is damaged ({type(e).__name__}: {str(e)[:120]}); "
                "falling back to the previous one"
            )
    raise RuntimeError(
        f"checkpoints {steps} in {mgr.directory} are all damaged: not starting from scratch; "
        "delete the checkpoints directory to start over"
    )


class MetricWriter:
    """Writes a run's metrics as TensorBoard event files in its workdir, with tensorboardX.

    The CLIs print their own progress lines; this keeps the curves (and the config, as text)
    for TensorBoard or any event-file reader. TensorFlow is not needed.
    """

    def __init__(self, logdir):
        from tensorboardX import SummaryWriter

        # One event file per process: their names would otherwise differ only by the second.
        suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""
        self._w = SummaryWriter(str(logdir), filename_suffix=suffix)

    def write_scalars(self, step: int, scalars: dict) -> None:
        """One point per scalar at ``step``."""
        for k, v in scalars.items():
            self._w.add_scalar(k, float(v), int(step))

    def write_hparams(self, hparams: dict) -> None:
        """The run's config, as JSON text under the tag ``hparams``."""
        self._w.add_text("hparams", json.dumps(hparams, default=str), 0)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class NullWriter:
    """A :class:`MetricWriter` that writes nothing (the processes other than 0 of a run)."""

    def write_scalars(self, step: int, scalars: dict) -> None:
        """Writes nothing."""

    def write_hparams(self, hparams: dict) -> None:
        """Writes nothing."""

    def flush(self) -> None:
        """Nothing to flush."""

    def close(self) -> None:
        """Nothing to close."""


def write_json(path: Path, obj) -> None:
    """Writes ``obj`` as indented JSON, atomically (a reader never sees half a file).

    Args:
      path: the file.
      obj: JSON-serialisable data.
    """
    write_text(path, json.dumps(obj, indent=1))


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (a reader never sees half a file).

    Args:
      path: the file.
      text: its contents.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def make_writer(workdir: Path) -> MetricWriter:
    """The metric writer of a run: TensorBoard event files (``events.out.tfevents.*``) in
    ``workdir``.

    Args:
      workdir: the run directory.

    Returns:
      A :class:`MetricWriter`.
    """
    return MetricWriter(workdir)


def fmt_time(seconds: float) -> str:
    """``1h02m03s`` style duration."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def restore_run(workdir) -> tuple[Run, dict, Any, dict]:
    """Opens a finished (or checkpointed) training run for analysis or export.

    Args:
      workdir: the run's directory (config.json, checkpoints/).

    Returns:
      ``(run, spec, state, results)``; ``results`` is results.json's content (or {}).

    Raises:
      FileNotFoundError: no config.json or no checkpoint, or a sweep's workdir (open one of
        its designs with ``experiments.sweep.load_setting``).
    """
    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"workdir={str(workdir)!r} has no config.json: not a qsparse run")
    config = ml_collections.ConfigDict(read_saved_config(cfg_path))
    if "sweep" in config:
        raise FileNotFoundError(
            f"workdir={str(workdir)!r} is a sweep, not a training run: open one of its designs "
            "with experiments.sweep.load_setting(workdir, setting)"
        )
    for f in ("block_shape", "first_block_shape", "last_block_shape"):
        config.sparsity[f] = tuple(config.sparsity[f])
    run = build_run(config)
    spec = make_spec(run)
    state0 = init_state(run, spec, config.seed)
    mgr = checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints)
    got = restore_checkpoint(mgr, state0)
    if got is None:
        raise FileNotFoundError(f"workdir={str(workdir)!r} has no checkpoint")
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    return run, spec, got[1], results
