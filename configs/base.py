"""Shared defaults for every experiment config; not an experiment itself.

Each field is documented here once; the experiment configs change only what they need.
"""

import ml_collections


def get_base() -> ml_collections.ConfigDict:
    """The base config: joint 2-bit weights / 2-bit activations / 4X blocks on Fashion-MNIST.

    Returns:
      A ConfigDict (unlocked; the caller locks it).
    """
    c = ml_collections.ConfigDict()
    # mnist | fashion_mnist | kmnist | cifar10 | digits | synthetic | synthetic_cifar10
    c.dataset = "fashion_mnist"
    c.data_dir = ""  # prepared TFDS data; "" = $QSPARSE_DATA_DIR or ~/.cache/qsparse/tfds
    c.idx_dir = ""  # a directory of IDX files; "" = the Debian package's files, then TFDS

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"  # mlp | lenet | vgg | resnet
    c.model.hidden = (512, 512)  # MLP hidden widths; for lenet/vgg the Dense width is hidden[-1]
    c.model.channels = (32, 64)  # conv channels (lenet: two stages, vgg/resnet: one per stage)
    # resnet: weight layers on the main path, 2 + 2 * blocks * len(channels) (8 = ResNet-8,
    # 20 = ResNet-20 on three stages); the other models ignore it.
    c.model.depth = 8

    c.quant = ml_collections.ConfigDict()
    c.quant.w_bits = 2  # weight bits, 1..8 or 32 (float)
    c.quant.a_bits = 2  # bits of every other layer's input activations, 1..8 or 32
    c.quant.first_w_bits = 0  # first layer's weight bits; 0 = same as w_bits
    c.quant.first_a_bits = 0  # bits of the first layer's input (the data); 0 = left as it is
    c.quant.last_w_bits = 0  # last (logits) layer's weight bits; 0 = same as w_bits
    c.quant.scale_mode = "learned"  # max | mean | learned (LSQ step size)
    c.quant.per_channel = False  # one weight scale per output channel
    c.quant.zero_level = True  # level set holds zero (2-bit = ternary)
    # weight gradient outside the quantizer's range: clipped (zero, LSQ) | identity (passed on,
    # so weights beyond the range are not frozen)
    c.quant.weight_grad = "clipped"
    # Weight of the oscillation-dampening loss (Nagel et al. 2022): the mean squared distance,
    # in steps, of the latent weights to their levels (0 = off); see Plan.level_penalty.
    c.quant.dampen = 0.0
    c.quant.act_clip = 2.0  # initial activation clip
    c.quant.learn_clip = True  # PACT: train the clip
    # Forward matmuls of Dense layers fed by a quantized Dense layer on the integer codes
    # (bfloat16, exact; needs learned steps and bits <= 8): see qsparse.wrap.Rule.int_matmul.
    c.quant.int_matmul = False
    # With int_matmul, those layers' backward matmuls in bfloat16 too (codes times the output
    # gradient rounded to bfloat16: not exact); see qsparse.wrap.Rule.bf16_grads.
    c.quant.bf16_grads = False
    c.quant.bias_bits = 32  # biases of the covered layers: 32 (float32) or 8 (int8 + a scale)

    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.compression = 4.0  # block compression ratio >= 1 (1 = dense)
    c.sparsity.block_shape = (8, 8)  # (bm, bn) on the kernel matrix view; () = no sparsity
    c.sparsity.first_block_shape = ()  # first layer's block shape; () = same as block_shape
    c.sparsity.last_block_shape = (8, 2)  # logits layer (10 outputs): (8, 2)
    c.sparsity.first_compression = 0.0  # 0 = same as compression
    c.sparsity.last_compression = 0.0  # 0 = same as compression
    c.sparsity.prox_strength = 1e-4  # block-lasso lambda (threshold = lr(t) * lambda)
    # none | rows (equal kept blocks per block row) | columns (the layer's kept blocks spread
    # evenly over its block columns: no output-channel group loses every block)
    c.sparsity.balanced = "none"
    c.sparsity.scope = "layer"  # layer | global block budget
    c.sparsity.prune_begin_epoch = 3  # phase 1 (train + prox) ends here
    c.sparsity.prune_end_epoch = 10  # phase 2 (gradual cubic pruning) ends here; then fine-tune
    c.sparsity.prune_every_steps = 100  # mask updates while pruning

    c.num_epochs = 20
    c.batch_size = 128
    c.learning_rate = 2e-3
    c.warmup_epochs = 1
    c.weight_decay = 0.0
    c.seed = 0
    c.eval_batch_size = 1000
    # After each epoch, the model's batch statistics recomputed as plain means over this many
    # training batches at the epoch's weights (BatchNorm re-estimation; 0 = the model's own
    # moving averages): see qsparse.training.make_recalibrate.
    c.recalibrate_batches = 0

    c.distill = ml_collections.ConfigDict()
    c.distill.weight = 0.0  # weight of the teacher's soft targets (0 = off)
    c.distill.temperature = 4.0
    c.distill.teacher_workdir = ""  # a finished FP32 run's workdir (its checkpoint is the teacher)

    # A finished run's workdir (e.g. FP32): its weights and batch statistics start this run,
    # and the weight quantizers' steps are initialised from them ("" = a fresh network).
    c.init_from = ""

    c.checkpoint_every_epochs = 1
    c.keep_checkpoints = 3
    return c
