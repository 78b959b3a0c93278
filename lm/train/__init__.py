"""Training: state pytree, mesh/sharding, Orbax checkpoints, the jitted loop, metrics."""

from lm.train.checkpoint import CheckpointError, Checkpointer
from lm.train.loop import NonFiniteError, TrainConfig, TrainResult, make_train_step, train
from lm.train.mesh import ConfigError, make_mesh, maybe_initialize_distributed, parse_mesh
from lm.train.state import TrainState, create_train_state

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "NonFiniteError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "create_train_state",
    "make_mesh",
    "make_train_step",
    "maybe_initialize_distributed",
    "parse_mesh",
    "train",
]
