"""Batch statistics re-estimated after each epoch (``recalibrate_batches``), end to end."""

import pytest

from configs import digits
from experiments import common
from experiments.train import train_and_evaluate


def test_recalibrated_batch_statistics_leave_training_unchanged(tmp_path):
    """configs/resnet.py at 2/2/4X with recalibrate_batches: the same training (losses), other
    batch statistics, and the checkpoint holds them (its evaluation is the run's accuracy)."""
    import jax
    import numpy as np

    from configs import resnet
    from qsparse import data, training

    def config(**over):
        c = resnet.get_config()
        c.dataset, c.model.channels, c.num_epochs = "digits", (8, 16, 16), 2
        c.quant.w_bits, c.quant.a_bits, c.sparsity.compression = 2, 2, 4.0
        c.sparsity.prune_begin_epoch, c.sparsity.prune_end_epoch = 0, 1
        c.sparsity.prune_every_steps = 2
        for k, v in over.items():
            c[k] = v
        return c

    plain = train_and_evaluate(config(), tmp_path / "plain")
    recal = train_and_evaluate(config(recalibrate_batches=4), tmp_path / "recal")
    assert [h["train_loss"] for h in recal["history"]] == [
        h["train_loss"] for h in plain["history"]
    ]
    assert "test_accuracy_moving_averages" not in plain["history"][-1]
    assert (
        recal["test_accuracy_moving_averages"]
        == recal["history"][-1]["test_accuracy_moving_averages"]
    )
    _, _, a, _ = common.restore_run(tmp_path / "plain")
    run, spec, b, _ = common.restore_run(tmp_path / "recal")
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    assert any(
        not np.allclose(x, y)
        for x, y in zip(jax.tree.leaves(a.model_state), jax.tree.leaves(b.model_state))
    )
    ds = data.to_device(common.load_data(run.config))
    ev = training.make_eval(run.model, run.plan)(
        b.params, spec, ds["test_x"], ds["test_y"], b.model_state
    )
    assert round(float(ev["accuracy"]), 6) == recal["test_accuracy"]
    for bad, match in ((-1, "use a whole number >= 0"), (100, "use at most")):
        with pytest.raises(
            common.ConfigError, match=f"recalibrate_batches={bad} is not allowed: {match}"
        ):
            train_and_evaluate(config(recalibrate_batches=bad), tmp_path / "bad")
    with pytest.raises(common.ConfigError, match="model 'mlp' has no batch statistics"):
        mlp = digits.get_config()
        mlp.recalibrate_batches = 2
        train_and_evaluate(mlp, tmp_path / "mlp")
