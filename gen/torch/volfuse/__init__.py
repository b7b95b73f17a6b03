"""volfuse inside PyTorch: drop-in modules whose forward and backward run volfuse's kernels.

    import volfuse
    bn = volfuse.BatchNorm3d(64)          # a torch.nn.BatchNorm3d, computed by volfuse
    model = volfuse.convert(model)        # every torch.nn.BatchNorm3d of a model, in place
    model = volfuse.convert_sync_batchnorm(model)  # ... or volfuse.SyncBatchNorm over torch.distributed

The operators live in the native library next to this file (_volfuse_ops.so, built from
gen/torch/ops.cpp) and are registered as torch.ops.volfuse.*; docs/torch.md says what is
supported and what falls back to PyTorch.
"""
import os

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["BatchNorm3d", "SyncBatchNorm", "convert", "convert_sync_batchnorm", "ops_library"]

#: The native library this package loaded its operators from.
ops_library = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_volfuse_ops.so")


def _load_ops():
    # One TORCH_LIBRARY per namespace and process: a second copy of the library (another
    # path) would abort the process, so never load twice.
    if ops_library in torch.ops.loaded_libraries:
        return
    try:
        torch.ops.volfuse.batch_norm  # registered already (e.g. linked into a C++ host)
        return
    except (RuntimeError, AttributeError):
        pass
    torch.ops.load_library(ops_library)


_load_ops()


def _factor(m):
    """(exponential_average_factor, whether num_batches_tracked counts this call), as
    torch.nn.modules.batchnorm._BatchNorm.forward computes them."""
    count = m.training and m.track_running_stats and m.num_batches_tracked is not None
    if m.momentum is None:
        return (1.0 / float(m.num_batches_tracked + 1) if count else 0.0), count
    return m.momentum, count


def _as_5d(x):
    """(N, C, *) as (N, C, L, 1, 1): batch norm only sees N * L values per channel."""
    if x.dim() == 5:
        return x
    length = 1
    for s in x.shape[2:]:
        length *= s
    return x.reshape(x.shape[0], x.shape[1], length, 1, 1)


def _batch_norm(m, input, group):
    """m's forward on a CPU float32/float64 input of 2 to 5 dimensions (viewed as 5-D), over
    `group` ((process group, world size) of a synchronized training forward) or alone.
    num_batches_tracked is counted only once the call succeeded: a failed call changes nothing."""
    factor, count = _factor(m)
    batch_stats = m.training or (m.running_mean is None and m.running_var is None)
    use_running = not m.training or m.track_running_stats
    rm = m.running_mean if use_running else None
    rv = m.running_var if use_running else None
    if group is not None:
        def local():  # every local check, inside the agreement: an error here raises on all processes
            m._check_input_dim(input)
            m._check_non_zero_input_channels(input)
            if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
                raise ValueError("volfuse.SyncBatchNorm: a synchronized forward takes CPU float32 or float64 "
                                 "tensors, got {} on {}".format(input.dtype, input.device))
            x = _as_5d(input)
            return x, torch.ops.volfuse.sync_batch_norm_message(x, m.weight, m.bias, rm, rv, m.eps)
        channels = input.shape[1] if input.dim() > 1 else -1
        x, message = _agree(local, channels, group[0], group[1], "forward")
        out = _SyncBatchNormFunction.apply(x, m.weight, m.bias, rm, rv, m.eps, factor, False, group[0], group[1],
                                           message)
    else:
        x = _as_5d(input)
        if batch_stats:
            size = x.size()
            if size[0] * size[2] * size[3] * size[4] == 1:
                raise ValueError("Expected more than 1 value per channel when training, got input size {}".format(
                    input.size()))
        out, _ = torch.ops.volfuse.batch_norm(x, m.weight, m.bias, rm, rv, batch_stats, factor, m.eps, False)
    if count:
        m.num_batches_tracked.add_(1)
    return out if out.shape == input.shape else out.reshape(input.shape)


class BatchNorm3d(torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d whose forward and backward run volfuse (CPU, float32 and float64).

    Same constructor, parameters, buffers, state_dict keys, repr and train/eval as
    torch.nn.BatchNorm3d.  Inputs on other devices or of other dtypes run PyTorch's own
    batch norm (docs/torch.md).
    """

    def forward(self, input):
        self._check_input_dim(input)
        if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
            return super().forward(input)
        return _batch_norm(self, input, None)

    @classmethod
    def from_module(cls, bn):
        """A volfuse.BatchNorm3d sharing bn's parameters and buffers (the same tensors, so an
        optimizer built on the original keeps working), with its mode and configuration."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        with torch.no_grad():
            if bn.affine:
                new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


def convert(module):
    """Replaces every torch.nn.BatchNorm3d in `module` (itself included, at any depth, in
    nn.Sequential or as attributes) by a volfuse.BatchNorm3d sharing its parameters, buffers
    and mode; returns the module (the same object unless `module` itself was a BatchNorm3d).
    Subclasses of torch.nn.BatchNorm3d with a forward of their own are left alone.

    Not yet: Conv3d -> BatchNorm3d -> ReLU patterns become volfuse's fused block
    (docs/torch.md lists what is done)."""
    if type(module) is torch.nn.BatchNorm3d:
        return BatchNorm3d.from_module(module)
    for name, child in module.named_children():
        new = convert(child)
        if new is not child:
            setattr(module, name, new)
    return module


# --- SyncBatchNorm ------------------------------------------------------------------------
# The collectives run here (a 1.13 operator cannot take a process group); the local phases
# are the ops (gen/torch/ops.cpp, vf::SyncBatchNorm3d's split phases).  Every call first
# agrees on errors: each process runs its local phase, which checks all arguments, and all
# exchange a fixed-size header (ok, channels, message); an error anywhere is raised on every
# process before any data is gathered, so none waits for one that gave up.

_HEADER = 256  # bytes: ok flag, channel count (int64 at 8), error message from 16


def _all_gather(t, group, world_size):
    """The processes' copies of t (equal shapes), stacked in rank order."""
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _agree(step, channels, group, world_size, when):
    try:
        result, error = step(), None
    except Exception as e:  # any error: this process must still take part in the round
        result, error = None, e
    header = torch.zeros(_HEADER, dtype=torch.uint8)
    header[0] = 1 if error is None else 0
    header[8:16] = torch.tensor([channels], dtype=torch.int64).view(torch.uint8)
    if error is not None:
        text = str(error).encode()[:_HEADER - 17]
        header[16:16 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    headers = _all_gather(header, group, world_size)
    if error is not None:
        raise error
    me = dist.get_rank(group)
    for r in range(world_size):
        if headers[r, 0].item() == 0:
            text = bytes(headers[r, 16:].tolist()).rstrip(b"\0").decode(errors="replace")
            raise RuntimeError("volfuse.SyncBatchNorm: process {} of {} failed in {}: {}".format(
                r, world_size, when, text))
    for r in range(world_size):
        c = int(headers[r, 8:16].contiguous().view(torch.int64).item())
        if c != channels:
            raise RuntimeError("volfuse.SyncBatchNorm: processes disagree on the channel count: process {} has {}, "
                               "process {} has {}".format(me, channels, r, c))
    return result


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm of the group's global batch on this process's part (5-D), as
    torch.nn.modules._functions.SyncBatchNorm with volfuse's phases: statistics merged in
    rank order (every process gets the same bits), backward sums gathered the same way."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, relu, group, world_size, message):
        # message: this process's sync_batch_norm_message of input, agreed on by all processes.
        gathered = _all_gather(message, group, world_size)
        try:  # fails identically on every process (all see the same gathered counts)
            out, reserve = torch.ops.volfuse.sync_batch_norm(input, weight, bias, running_mean, running_var,
                                                             gathered, momentum, eps, relu)
        except RuntimeError as e:
            if "Expected more than 1 value per channel" in str(e):
                raise ValueError(str(e)) from None
            raise
        ctx.save_for_backward(input, weight, reserve)
        ctx.count = int(gathered[:, 0].sum().item())
        ctx.relu, ctx.eps, ctx.group, ctx.world_size = relu, eps, group, world_size
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, reserve = ctx.saved_tensors
        group, world_size = ctx.group, ctx.world_size
        message = _agree(lambda: torch.ops.volfuse.sync_batch_norm_backward_message(
            grad_output, input, weight, reserve, ctx.count, ctx.relu, ctx.eps), input.size(1), group, world_size,
            "backward")
        gathered = _all_gather(message, group, world_size)
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        dx, dw, db = torch.ops.volfuse.sync_batch_norm_backward(
            grad_output, input, weight, reserve, ctx.count, gathered, dist.get_rank(group), ctx.relu, ctx.eps, mask)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None, None, None, None)


def _sync_group(m):
    """(group, world size) when m's forward synchronizes (training with batch statistics over
    more than one process), else None: torch.nn.SyncBatchNorm.forward's decision."""
    if not m.training:
        return None
    group = m.process_group if m.process_group else dist.group.WORLD
    world_size = dist.get_world_size(group)
    return (group, world_size) if world_size > 1 else None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm for CPU tensors (torch's own raises there): batch norm over the
    global batch of a torch.distributed process group (gloo), inputs of 2 to 5 dimensions,
    float32 and float64; eval mode and single-process groups run volfuse's local batch norm,
    as torch's falls back to F.batch_norm (other devices or dtypes: torch's forward there).  A
    synchronized forward checks its input inside the processes' agreement round, so that any
    process's error (another dtype or device included) raises on all of them.

    Same constructor, parameters, buffers, state_dict keys and repr as torch.nn.SyncBatchNorm,
    of which it is not a subclass: DistributedDataParallel (1.13) refuses those in CPU modules.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input):
        group = _sync_group(self)
        if group is not None:  # checks inside the agreement round (an error raises on every process)
            return _batch_norm(self, input, group)
        if input.device.type != "cpu" or input.dtype not in (torch.float32, torch.float64):
            return torch.nn.SyncBatchNorm.forward(self, input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return _batch_norm(self, input, None)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """As torch.nn.SyncBatchNorm.convert_sync_batchnorm, with volfuse.SyncBatchNorm:
        every BatchNorm*D (volfuse's included) becomes one sharing its parameters and buffers."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


def convert_sync_batchnorm(module, process_group=None):
    """volfuse.SyncBatchNorm.convert_sync_batchnorm(module, process_group)."""
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
