"""Synchronised BatchNorm: training statistics over the global batch (every rank's batch)."""

from __future__ import annotations

import horovod.torch as hvd
import torch


class CPUSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the whole global batch, on the CPU.

    ``hvd.SyncBatchNorm`` only accepts CUDA tensors. Here the per-channel sums, sums of squares
    and counts go through one differentiable ``hvd.allreduce`` (its backward allreduces the
    gradients), so forward and backward equal BatchNorm over the concatenated batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not hvd.is_initialized() or hvd.size() == 1:
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                           x.new_tensor([x.numel() / c])])
        total = hvd.allreduce(local, op=hvd.Sum)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batchnorm(model: torch.nn.Module, cuda: bool | None = None) -> torch.nn.Module:
    """Replace every BatchNorm2d with a synchronised one (statistics over all ranks):
    ``hvd.SyncBatchNorm`` on CUDA, ``CPUSyncBatchNorm`` on the CPU."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    for name, child in list(model.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            cls = hvd.SyncBatchNorm if cuda else CPUSyncBatchNorm
            sync = cls(child.num_features, child.eps, child.momentum, child.affine,
                       child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            sync_batchnorm(child, cuda)
    return model
