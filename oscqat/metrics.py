"""The names of the metrics a training epoch reports: one list, read by every writer above it.

Torch-free, so read-only commands (reports, status) can know the names without importing torch.
"""

METRIC_NAMES = (
    "epoch", "train_loss", "val_loss", "val_top1", "val_top1_no_bnre", "dampen_loss", "dampen_lambda",
    "freeze_threshold", "lr", "osc_frac", "osc_frac_depthwise", "osc_frac_pointwise", "frozen_frac",
    "scale_flip_frac", "epoch_time_s", "compile_time_s", "compile_graphs", "samples_per_s", "model_size_kb", "bops_g",
    # held-out test split, measured at the last epoch only (None before): never selected on
    "test_top1", "test_top1_no_bnre", "test_loss",
)
# compile_graphs: graphs torch.compile built in the epoch; 1 in a compiled run's first epoch, 0
# after. More than 1 means graph breaks or recompilations (CompiledForward warns of them).
TEST_METRICS = ("test_top1", "test_top1_no_bnre", "test_loss")
# what MLflow logs per epoch (the epoch is the step)
SCALAR_METRICS = tuple(name for name in METRIC_NAMES if name != "epoch")
