"""GradNorm (Chen et al., ICML 2018, arXiv:1711.02257) for PyTorch, on ``torch.func``.

Most users need the first group: the ``GradNorm`` module (``loss = gradnorm(L_i)``) or the
functional ``init_state`` / ``step`` pair. The second group serves custom training steps:
per-task gradients for accumulation, the fork fast path, and data-parallel synchronisation.
"""

from gradnorm_func._distributed import check_same_tasks, sync_task_gradients
from gradnorm_func._fork import fork, fork_gradients, fork_probe
from gradnorm_func._gradients import task_gradients
from gradnorm_func._objective import GradNormAux, gradnorm_loss
from gradnorm_func._reporting import SkippedUpdateWarning
from gradnorm_func._state import GradNormState, init_state, state_from_dict, state_to_dict
from gradnorm_func._step import step, step_from_gradients, step_from_norms
from gradnorm_func._update import update
from gradnorm_func._wrapper import GradNorm

__all__ = [
    # What most users need.
    "GradNorm",
    "GradNormAux",
    "GradNormState",
    "SkippedUpdateWarning",
    "gradnorm_loss",
    "init_state",
    "state_from_dict",
    "state_to_dict",
    "step",
    "update",
    # Custom training steps: accumulation, the fork fast path, data parallelism.
    "check_same_tasks",
    "fork",
    "fork_gradients",
    "fork_probe",
    "step_from_gradients",
    "step_from_norms",
    "sync_task_gradients",
    "task_gradients",
]
