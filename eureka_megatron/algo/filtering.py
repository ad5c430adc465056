"""Online accuracy filter (MM-Eureka / DAPO dynamic sampling).

A prompt whose n responses are all right or all wrong has zero group-relative advantage: it
costs a training step and teaches nothing, and MM-Eureka found that training on such batches
collapses accuracy. The filter keeps a group only when its mean accuracy lies in [low, high];
the loop keeps sampling until the train batch is full. A group whose accuracies are all equal
is dropped even inside the band (partial-credit rewards: n responses all scored 0.5 have zero
advantage, exactly like all-right or all-wrong ones).
"""
from __future__ import annotations

import torch


def online_filter(accuracy, group_size: int, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """bool [N]: True for the samples of groups whose mean accuracy is within [low, high]
    (inclusive) and whose accuracies are not all equal. Samples of a group are contiguous;
    accuracy is the accuracy reward, not the total."""
    a = torch.as_tensor(accuracy, dtype=torch.float64)
    if a.dim() != 1:
        raise ValueError(f"accuracy must be 1-D [N], got shape {tuple(a.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if a.numel() == 0 or a.numel() % group_size:
        raise ValueError(f"{a.numel()} accuracies do not form whole groups of {group_size}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if not torch.isfinite(a).all():
        i = int((~torch.isfinite(a)).nonzero()[0])
        raise ValueError(f"accuracy {i} is {float(a[i])}: must be finite")
    # sum / n (not a running mean) so that e.g. 1/8 compares exactly against its literal
    g = a.view(-1, group_size)
    mean = g.sum(dim=1) / group_size
    keep = (mean >= low) & (mean <= high) & (g.amax(dim=1) > g.amin(dim=1))
    return keep.repeat_interleave(group_size)
