"""Training the project's own small CODI model (the embedded default) and its baselines.

    from interp.train import train_preset, cli_train
    train_preset("embedded", "out/")       # phase 1 teacher + phase 2 CODI, official checkpoint format
    train_preset("direct-baseline", "out-direct/")
    train_preset("micro", "/tmp/m")        # seconds; for tests

See docs/embedded_model.md for the objective (including the non-published per-step term).
"""

from interp.train.evaluate import StudentGeneration, evaluate_model, student_generate
from interp.train.modeling import load_checkpoint, save_checkpoint
from interp.train.presets import PRESETS, cli_train, get_preset, train_preset
from interp.train.trainer import TrainConfig, TrainResult, train

__all__ = [
    "PRESETS",
    "StudentGeneration",
    "TrainConfig",
    "TrainResult",
    "cli_train",
    "evaluate_model",
    "get_preset",
    "load_checkpoint",
    "save_checkpoint",
    "student_generate",
    "train",
    "train_preset",
]
