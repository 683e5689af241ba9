"""GradNorm (Chen et al., ICML 2018, arXiv:1711.02257) on ``torch.func``."""

from gradnorm_func.distributed import all_reduce_task_grads, check_same_tasks
from gradnorm_func.fork import fork, fork_norms, fork_probe
from gradnorm_func.norms import per_task_norms, task_gradient_norms
from gradnorm_func.objective import (
    GradNormAux,
    gradnorm_loss,
    gradnorm_loss_from_norms,
    loss_grad_gradient,
)
from gradnorm_func.state import (
    GradNormHyperParams,
    GradNormState,
    init_state,
    state_from_dict,
    state_to_dict,
)
from gradnorm_func.step import step, step_from_norms
from gradnorm_func.update import update
from gradnorm_func.wrapper import GradNorm

__all__ = [
    "GradNorm",
    "GradNormAux",
    "GradNormHyperParams",
    "GradNormState",
    "all_reduce_task_grads",
    "check_same_tasks",
    "fork",
    "fork_norms",
    "fork_probe",
    "gradnorm_loss",
    "gradnorm_loss_from_norms",
    "init_state",
    "loss_grad_gradient",
    "per_task_norms",
    "state_from_dict",
    "state_to_dict",
    "step",
    "step_from_norms",
    "task_gradient_norms",
    "update",
]
