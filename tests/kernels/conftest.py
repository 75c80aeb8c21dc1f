"""Kernel tests run the Triton backend on CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` body is decorated, i.e. before
``megatron_rl.kernels.linear_logprobs_triton`` is first imported; conftest files load
before test modules, so this is early enough. Only without CUDA: on a GPU machine the
same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
