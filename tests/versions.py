"""The torch versions that some tests need; CI runs torch 2.13, where every test runs."""

from __future__ import annotations

import pytest
import torch
from torch.torch_version import TorchVersion

# torch.compile(fullgraph=True) of a step with torch.func transforms: the compiled tests pass with
# torch 2.6.0, 2.8.0, 2.9.1, 2.10.0 and 2.13.0. torch 2.4.1 cannot trace functional_call of a
# module inside torch.func.grad, 2.3 does not capture torch.func transforms by default, and 2.1
# not at all.
COMPILES_FULLGRAPH = TorchVersion(torch.__version__) >= "2.6"
needs_fullgraph_compile = pytest.mark.skipif(
    not COMPILES_FULLGRAPH, reason="fullgraph compile of torch.func steps needs torch >= 2.6")

# torch.amp.GradScaler("cpu") appeared in torch 2.3.
needs_cpu_grad_scaler = pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.3", reason="torch.amp.GradScaler('cpu') needs torch >= 2.3")

# mypy --strict reads torch's own annotations: clean with torch 2.9.1, 2.10.0 and 2.13.0; torch
# 2.1.2's annotations make it report Any and wrong return types in tensor arithmetic.
needs_typed_torch = pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.9", reason="mypy --strict is checked against torch >= 2.9")

# transformers 5, which the Hugging Face Trainer example uses, disables its PyTorch models
# below torch 2.6.
needs_transformers_torch = pytest.mark.skipif(
    not COMPILES_FULLGRAPH, reason="transformers 5 needs torch >= 2.6")

# Counting GradNorm's collectives: torch 2.4.1 and later issue one collective per functional
# all_reduce; torch 2.1.2 advances the group's sequence number twice for it.
counts_collectives = pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.4",
    reason="the collective count is checked with torch >= 2.4 (2.1 counts two per all_reduce)")

# A float16 model on the CPU: torch 2.1.2 has no float16 addmm there; 2.4.1 has.
needs_cpu_half_matmul = pytest.mark.skipif(
    TorchVersion(torch.__version__) < "2.4", reason="float16 matmul on the CPU needs torch >= 2.4")
