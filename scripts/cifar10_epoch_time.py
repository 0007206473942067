"""Minutes per CIFAR-10 training epoch of configs/cifar10_vgg.py on this machine, measured on
generated images of CIFAR-10's shapes (the ``synthetic_cifar10`` data set, 16 steps an epoch):
a 3-epoch run's training time minus a 1-epoch run's (compilation and one epoch) is two epochs'
steps, scaled to CIFAR-10's 390 steps of 128.

  .venv/bin/python scripts/cifar10_epoch_time.py
"""

import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import cifar10_vgg  # noqa: E402
from experiments.train import train_and_evaluate  # noqa: E402

STEPS_PER_EPOCH = 50_000 // 128  # CIFAR-10's training split at the config's batch size


def main() -> None:
    """Prints seconds per step and minutes per CIFAR-10 epoch."""
    seconds = {}
    for epochs in (1, 3):
        c = cifar10_vgg.get_config()
        c.dataset = "synthetic_cifar10"
        c.num_epochs = epochs
        c.sparsity.prune_begin_epoch = 0
        c.sparsity.prune_end_epoch = epochs
        c.sparsity.prune_every_steps = 4
        c.checkpoint_every_epochs = epochs
        with tempfile.TemporaryDirectory() as wd:
            seconds[epochs] = train_and_evaluate(c, pathlib.Path(wd))["train_seconds"]
    per_step = (seconds[3] - seconds[1]) / 32
    print(
        f"{per_step:.3f} s a step: {per_step * STEPS_PER_EPOCH / 60:.1f} minutes per CIFAR-10 "
        f"epoch of {STEPS_PER_EPOCH} steps"
    )


if __name__ == "__main__":
    main()
