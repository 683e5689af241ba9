"""Closed-form per-task gradients of a Linear or ConvNd layer, for the wrapper's fast path.

When the fork z is the shared layer's output y = layer(h), or an elementwise activation of
it, z = f(y), the cotangents c_i = a_i dL_i/dz captured at the fork give every task's
gradient at W without re-entrant autograd (Chen et al. 2018 need only these norms):

    c_i^y = c_i * f'(y)
    Linear:  grad_W (a_i L_i) = (c_i^y)^T h,  grad_b = sum_n c_i^y   (all T: one batched matmul)
    ConvNd:  grad_W (a_i L_i) = conv_weight_grad(h, c_i^y)          (one weight-gradient
             convolution per task, so that only one task's c_i^y exists at a time)

Any other segment goes through the generic vjp of :mod:`gradnorm_func._capture`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gradnorm_func._types import ClosedFormLayer

# Activations whose vjp is elementwise, c * f'(y), by their autograd node's name.
_ELEMENTWISE = {"Relu", "LeakyRelu", "Gelu", "Silu", "Sigmoid", "Tanh", "Elu", "Hardtanh",
                "Softplus", "Mish", "Hardswish", "Hardsigmoid"}


class LayerCall(NamedTuple):
    """What the shared layer's forward hook saw: its input h and its output's autograd node."""

    inputs: Tensor
    output_node: torch.autograd.graph.Node


def closed_form_layer(layer: object, params: list[Tensor]) -> ClosedFormLayer | None:
    """``layer`` if it is a Linear or an ungrouped, zero-padded Conv1d/2d/3d whose trainable
    parameters are exactly ``params`` (its weight, and its bias when that is trainable)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return None
    elif not isinstance(layer, nn.Linear):
        return None
    own = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    same = [id(p) for p in own if p.requires_grad] == [id(p) for p in params]
    return layer if same else None


def elementwise_activation(z: Tensor, call: LayerCall
                           ) -> tuple[bool, torch.autograd.graph.Node | None]:
    """Whether z is the layer's output or an elementwise activation of it, and that
    activation's node (None when z is the output itself)."""
    node = z.grad_fn
    if node is None:
        return False, None
    if node is call.output_node:
        return True, None
    inputs = node.next_functions
    name = re.sub(r"Backward\d*$", "", node.name())
    if len(inputs) == 1 and inputs[0][0] is call.output_node and name in _ELEMENTWISE:
        return True, node
    return False, None


def activation_derivative(z: Tensor, activation: torch.autograd.graph.Node) -> Tensor:
    """f'(y) for z = f(y), by the activation's own vjp of ones. Must run before the backward
    has executed the activation's node."""
    derivative: Tensor = activation(torch.ones_like(z))  # type: ignore[operator]
    return derivative


def is_relu(activation: torch.autograd.graph.Node | None) -> bool:
    """Whether the activation is a ReLU, whose vjp is ``threshold_backward(c, z, 0)``."""
    return activation is not None and activation.name().startswith("ReluBackward")


def layer_gradients(layer: ClosedFormLayer, inputs: Tensor, cotangent: Tensor) -> list[Tensor]:
    """One task's grad_W (a_i L_i) from its cotangent a_i dL_i/dy at the layer's output y.

    Returns the gradient of the weight, then that of the bias when it is trainable.
    """
    dtype = torch.promote_types(cotangent.dtype, inputs.dtype)
    cotangent, inputs = cotangent.to(dtype), inputs.detach().to(dtype)
    weight, bias = layer.weight, layer.bias
    train_bias = bias is not None and bias.requires_grad
    if isinstance(layer, nn.Linear):
        c = cotangent.reshape(-1, cotangent.shape[-1])  # [N, d_out]
        grads = [c.t() @ inputs.reshape(-1, inputs.shape[-1])]
        return grads + [c.sum(0)] if train_bias else grads
    spatial = weight.dim() - 2
    if inputs.dim() == spatial + 1:  # an unbatched input: add the batch axis
        inputs, cotangent = inputs.unsqueeze(0), cotangent.unsqueeze(0)
    stand_in = cotangent.new_empty(1).expand(weight.shape)  # only its shape is read
    grads = [torch.ops.aten.convolution_backward(
        cotangent, inputs, stand_in, None, list(layer.stride), list(layer.padding),
        list(layer.dilation), False, [0] * spatial, 1, [False, True, False])[1]]
    return grads + [cotangent.sum([0, *range(2, cotangent.dim())])] if train_bias else grads


def linear_task_gradients(layer: nn.Linear, inputs: Tensor, cotangents: Tensor
                          ) -> list[Tensor]:
    """:func:`layer_gradients` of a Linear layer for all T tasks in one batched matmul.

    Args:
        cotangents: Tensor[T, *y.shape], a_i dL_i/dy for each task.

    Returns:
        [T, *W.shape] for the weight, then [T, *b.shape] for a trainable bias.
    """
    num_tasks = cotangents.shape[0]
    dtype = torch.promote_types(cotangents.dtype, inputs.dtype)
    c = cotangents.to(dtype).reshape(num_tasks, -1, cotangents.shape[-1])  # [T, N, d_out]
    h = inputs.detach().to(dtype).reshape(-1, inputs.shape[-1])  # [N, d_in]
    grads = [torch.bmm(c.transpose(1, 2), h.expand(num_tasks, *h.shape))]
    bias = layer.bias
    return grads + [c.sum(1)] if bias is not None and bias.requires_grad else grads
