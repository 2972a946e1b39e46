"""Initialisation and batch-norm conventions of the authors' TF-slim code (SPEC 3.4).

PyTorch's defaults differ (kaiming-uniform weights, BN eps 1e-5 and momentum 0.1), and the paper's
numbers were produced with slim's, so every layer of the package is built through these helpers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nextvlad._dtypes import at_least_float32

#: slim.batch_norm defaults: decay 0.999 -> PyTorch momentum 0.001; epsilon 0.001.
BN_EPS = 1e-3
BN_MOMENTUM = 1e-3


def variance_scaling_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """slim.variance_scaling_initializer(): truncated normal, std sqrt(2.6 / fan_in), cut at 2 std.

    slim's factor 2.0 with its truncation correction 1.3 gives sigma = sqrt(1.3 * 2 / fan_in).
    """
    std = math.sqrt(2.6 / fan_in)
    with torch.no_grad():
        tensor.normal_(0.0, std)
        if tensor.is_meta:
            return tensor
        # Resample what falls beyond 2 std, as TF's truncated_normal does: about 4.6% per round.
        # (nn.init.trunc_normal_'s inverse-CDF sampling is ~15x slower on a 236M-parameter model.)
        flat = tensor.view(-1)
        redo = torch.nonzero(flat.abs() > 2 * std).squeeze(1)
        while redo.numel():
            samples = torch.empty(redo.numel(), dtype=tensor.dtype, device=tensor.device).normal_(0.0, std)
            flat[redo] = samples
            redo = redo[samples.abs() > 2 * std]
        return tensor


def tf_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A Linear layer initialised like slim.fully_connected (fan_in = in_features, zero bias)."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    variance_scaling_(layer.weight, in_features)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def tf_batch_norm(num_features: int, fused: bool) -> "TFBatchNorm1d":
    """A BN with slim.batch_norm's epsilon and decay (gamma 1, beta 0); see ``TFBatchNorm1d``."""
    return TFBatchNorm1d(num_features, fused)


class TFBatchNorm1d(nn.BatchNorm1d):
    """slim.batch_norm, whose moving variance depends on the TF kernel the layer ran (SPEC 3.4).

    ``fused=True`` (the authors' gating_bn and mix_weights_bn; slim picks the fused kernel for
    rank-2 inputs unless told not to) tracks the Bessel-corrected batch variance, as PyTorch does.
    ``fused=False`` (cluster_bn, vlad_bn, hidden1_bn) tracks the *biased* one: PyTorch's would be
    n/(n-1) larger, +1.27% at 80 rows. F.batch_norm moves the running variance to
    (1-m) r + m s2 n/(n-1) for n rows; running it on r n/(n-1) and scaling the result by (n-1)/n
    gives (1-m) r + m s2 for every momentum, with no second pass over the input. The scaled copy
    is a separate tensor because autograd saves the one F.batch_norm is given.
    """

    def __init__(self, num_features: int, fused: bool) -> None:
        super().__init__(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[1] if x.dim() > 1 else 0
        training = self.training and self.track_running_stats
        if training and rows == 1:  # PyTorch refuses one row; slim trains on it
            self._check_input_dim(x)
            return self.normalize_with_batch_moments(x.reshape(1, -1), at_least_float32(x).reshape(1, -1)).to(
                x.dtype).reshape(x.shape)
        if self.fused or not training or rows < 2:
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        momentum = self._momentum()
        running_var = self.running_var * (rows / (rows - 1))
        output = F.batch_norm(x, self.running_mean, running_var, self.weight, self.bias, True, momentum, self.eps)
        with torch.no_grad():
            self.running_var.copy_(running_var * ((rows - 1) / rows))
        return output

    def _momentum(self) -> float:
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def normalize_with_batch_moments(self, x: torch.Tensor, statistics_rows: torch.Tensor) -> torch.Tensor:
        """Training-mode BN written out for a (rows, features) ``x``: the moments of
        ``statistics_rows`` move the moving averages by slim's rule and normalise ``x``, with
        gradients through them. One row has mean the row and variance 0 in both of TF's kernels
        (the fused one divides by max(n - 1, 1)), so its output is beta."""
        rows = statistics_rows.shape[0]
        mean = statistics_rows.mean(dim=0)
        var = statistics_rows.var(dim=0, unbiased=False)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self._momentum()
            tracked = var.detach() * (rows / max(rows - 1, 1)) if self.fused else var.detach()
            # Through .data, as F.batch_norm moves them, without a version bump: an earlier call in
            # the same graph (another BN tower) saved these buffers for its backward.
            self.running_mean.data.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.data.lerp_(tracked.to(self.running_var.dtype), momentum)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.fused}"


class MaskedBatchNorm1d(TFBatchNorm1d):
    """BN over rows of a (rows, features) matrix whose statistics may skip padded rows.

    The authors' cluster BN takes moments over every padded frame (SPEC 3.1 step 4), which is the
    default (``mask=None``). With a row mask, training statistics come from the real rows only;
    padded rows are normalised with the same statistics (their values are masked out downstream).
    The running variance follows ``fused`` either way.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None or not self.training:
            return super().forward(x)
        x = at_least_float32(x)  # fp32 statistics under bf16 autocast too
        real = x[mask]
        if real.shape[0] == 0:
            raise ValueError("masked batch norm needs at least 1 real frame in the batch, got 0")
        # Written out (not F.batch_norm) so that gradients flow through the masked statistics.
        return self.normalize_with_batch_moments(x, real)
