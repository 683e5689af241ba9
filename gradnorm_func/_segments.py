"""Closed-form per-task gradients of a Linear or ConvNd layer, for the wrapper's fast path.

When the fork z is the shared layer's output y = layer(h), or an elementwise activation of
it, z = f(y), the cotangents c_i = a_i dL_i/dz captured at the fork give every task's
gradient at W without re-entrant autograd (Chen et al. 2018 need only these norms):

    c_i^y = c_i * f'(y)
    Linear:  grad_W (a_i L_i) = (c_i^y)^T h,  grad_b = sum_n c_i^y     (one batched matmul)
    ConvNd:  grad_W (a_i L_i) = conv_weight_grad(h, c_i^y)            (one weight-gradient
             convolution with the T tasks stacked on the output channels)

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
_CONV_CHUNK_ELEMENTS = 1 << 22  # task-stacked cotangent elements per weight-gradient conv


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


def activation_derivative(z: Tensor, activation: torch.autograd.graph.Node | None
                          ) -> Tensor | None:
    """f'(y) for z = f(y), by the activation's own vjp of ones; None for no activation.
    Must run before the backward has executed the activation's node."""
    if activation is None:
        return None
    derivative: Tensor = activation(torch.ones_like(z))  # type: ignore[operator]
    return derivative


def layer_task_gradients(layer: ClosedFormLayer, inputs: Tensor, cotangents: Tensor
                         ) -> list[Tensor]:
    """grad_W (a_i L_i) for every task from the cotangents at the layer's output.

    Args:
        layer: the Linear or ConvNd of :func:`closed_form_layer`.
        inputs: h, the layer's input.
        cotangents: Tensor[T, *y.shape], a_i dL_i/dy for each task.

    Returns:
        [T, *W.shape] for the weight, then [T, *b.shape] for a trainable bias.
    """
    num_tasks = cotangents.shape[0]
    dtype = torch.promote_types(cotangents.dtype, inputs.dtype)
    cotangents, inputs = cotangents.to(dtype), inputs.detach().to(dtype)
    weight, bias = layer.weight, layer.bias
    train_bias = bias is not None and bias.requires_grad
    if isinstance(layer, nn.Linear):
        c = cotangents.reshape(num_tasks, -1, cotangents.shape[-1])  # [T, N, d_out]
        h = inputs.reshape(-1, inputs.shape[-1])  # [N, d_in]
        grads = [torch.bmm(c.transpose(1, 2), h.expand(num_tasks, *h.shape))]
        if train_bias:
            grads.append(c.sum(1))
        return grads
    conv = layer
    spatial = weight.dim() - 2  # cotangents: [T, N, C_out, *spatial]
    if inputs.dim() == spatial + 1:  # an unbatched input: add the batch axis
        inputs, cotangents = inputs.unsqueeze(0), cotangents.unsqueeze(1)
    batch, channels = cotangents.shape[1:3]
    chunk = max(1, _CONV_CHUNK_ELEMENTS // max(1, cotangents[0].numel()))
    weight_grads = []
    for part in torch.split(cotangents, chunk):
        tasks = part.shape[0]
        grad_out = part.transpose(0, 1).reshape(batch, tasks * channels, *part.shape[3:])
        stand_in = grad_out.new_empty(1).expand(tasks * channels, *weight.shape[1:])
        weight_grads.append(torch.ops.aten.convolution_backward(
            grad_out, inputs, stand_in, None, list(conv.stride),
            list(conv.padding), list(conv.dilation),
            False, [0] * spatial, 1, [False, True, False])[1]
            .view(tasks, *weight.shape))
    grads = [torch.cat(weight_grads) if len(weight_grads) > 1 else weight_grads[0]]
    if train_bias:
        grads.append(cotangents.sum([1, *range(3, cotangents.dim())]))
    return grads
