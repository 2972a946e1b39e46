"""Suite-wide test setup."""

import os

# Triton fixes interpreted vs compiled mode when it is first imported (Lightning imports it), so
# this has to happen before any test module is collected. Without a CUDA GPU nothing can run
# compiled Triton kernels anyway; with TRITON_INTERPRET=1 the residual_aggregation tests run the
# kernels on CPU tensors through the interpreter. Only code that launches Triton kernels is
# affected (on CPU that is only those tests); torch.compile on CPU generates C++, not Triton.
# On a GPU machine the variable is left alone, so the compiled kernels are what gets tested.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
