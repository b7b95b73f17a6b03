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
import torch.ao.nn.intrinsic
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = ["BatchNorm3d", "ConvBnReLU3d", "SyncBatchNorm", "conv_bn_relu3d", "convert", "convert_sync_batchnorm",
           "ops_library"]

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


# --- Conv3d -> BatchNorm3d -> ReLU ---------------------------------------------------------

def _fusable(conv, bn, input):
    """Whether volfuse's fused op computes relu(bn(conv(input))): a plain Conv3d (groups 1,
    zero padding given as numbers) and a plain BatchNorm3d over its outputs, on a 5-D CPU
    float32 or float64 input of the conv's dtype."""
    return (type(conv) is torch.nn.Conv3d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and type(bn) in (torch.nn.BatchNorm3d, BatchNorm3d)
            and bn.num_features == conv.out_channels and isinstance(input, torch.Tensor) and input.dim() == 5
            and input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)
            and conv.weight.dtype == input.dtype and conv.weight.device.type == "cpu")


def _conv_output_size(conv, size):
    return [(size[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
            // conv.stride[i] + 1 for i in range(3)]


def conv_bn_relu3d(conv, bn, input):
    """relu(bn(conv(input))) for a torch.nn.Conv3d and a BatchNorm3d over its outputs, as
    PyTorch computes it (bn's running statistics and num_batches_tracked updated in training),
    by volfuse's fused block where it applies (CPU float32/float64, groups 1, zero padding),
    else by the modules themselves."""
    if not _fusable(conv, bn, input):
        return torch.relu(bn(conv(input)))
    factor, count = _factor(bn)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_running = not bn.training or bn.track_running_stats
    rm = bn.running_mean if use_running else None
    rv = bn.running_var if use_running else None
    if batch_stats and input.shape[1] == conv.in_channels:
        o = _conv_output_size(conv, input.shape)
        if input.shape[0] * o[0] * o[1] * o[2] == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input size {}".format(
                torch.Size([input.shape[0], conv.out_channels] + o)))
    out = torch.ops.volfuse.conv_bn_relu3d(input, conv.weight, conv.bias, bn.weight, bn.bias, rm, rv, conv.stride,
                                           conv.padding, conv.dilation, batch_stats, factor, bn.eps)[0]
    if count:
        bn.num_batches_tracked.add_(1)
    return out


class ConvBnReLU3d(torch.nn.Sequential):
    """Conv3d -> BatchNorm3d -> ReLU computed by volfuse's fused block (CPU float32/float64).

    Holds the given modules as children 0 and 1 (and a ReLU as 2), as
    torch.ao.nn.intrinsic.ConvBnReLU3d does: the same parameters (the same tensors), state_dict
    keys ("0.weight", "1.running_mean", ...) and train/eval.  A torch.nn.BatchNorm3d becomes a
    volfuse.BatchNorm3d sharing its tensors.  Inputs the fused op does not take (other dtypes
    or devices, grouped or non-zero-padded convs) run the modules one after the other."""

    def __init__(self, conv, bn, relu=None):
        if not isinstance(conv, torch.nn.Conv3d):
            raise TypeError("volfuse.ConvBnReLU3d: conv must be a torch.nn.Conv3d, got {}".format(type(conv).__name__))
        if not isinstance(bn, torch.nn.BatchNorm3d):
            raise TypeError("volfuse.ConvBnReLU3d: bn must be a torch.nn.BatchNorm3d, got {}".format(type(bn).__name__))
        if bn.num_features != conv.out_channels:
            raise ValueError("volfuse.ConvBnReLU3d: BatchNorm3d has {} features but the Conv3d has {} output "
                             "channels".format(bn.num_features, conv.out_channels))
        if type(bn) is torch.nn.BatchNorm3d:
            bn = BatchNorm3d.from_module(bn)
        super().__init__(conv, bn, torch.nn.ReLU() if relu is None else relu)

    def forward(self, input):
        return conv_bn_relu3d(self[0], self[1], input)

    @classmethod
    def from_module(cls, fused):
        """From a torch.ao.nn.intrinsic.ConvBnReLU3d (or any (conv, bn, relu) sequence)."""
        return cls(fused[0], fused[1], fused[2])


def _is_relu(node):
    if node.op == "call_function":
        return node.target in (torch.relu, torch.nn.functional.relu) and len(node.args) == 1
    if node.op == "call_method":
        return node.target == "relu" and len(node.args) == 1 and not node.kwargs
    return False


def _fuse_forward(module):
    """Rewrites module's own forward (traced by torch.fx, its submodules as leaves) so that each
    conv -> bn -> relu chain whose intermediate results feed nothing else calls
    conv_bn_relu3d(conv, bn, x).  Returns whether it found any.  Modules fx cannot trace, and
    modules whose traced code depends on train/eval mode, are left as they are."""
    import types
    import torch.fx

    class Leaves(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return True  # every submodule is a call; each gets its own pass in convert()

    modes = {m: m.training for m in module.modules()}
    try:
        graphs = []
        for mode in (True, False):
            module.train(mode)
            graphs.append(Leaves().trace(module))
    except Exception:  # noqa: BLE001  (anything fx cannot trace stays as it is)
        return False
    finally:
        for m, mode in modes.items():
            m.training = mode
    if str(graphs[0]) != str(graphs[1]):
        return False  # forward depends on self.training: a traced copy would freeze one mode
    graph = graphs[0]

    def module_of(node, kinds):
        if node.op != "call_module":
            return None
        m = module.get_submodule(node.target)
        return m if type(m) in kinds else None

    found = False
    for relu in list(graph.nodes):
        is_relu = _is_relu(relu) or module_of(relu, (torch.nn.ReLU,)) is not None
        if not is_relu or not isinstance(relu.args[0], torch.fx.Node):
            continue
        bn_node = relu.args[0]
        bn = module_of(bn_node, (torch.nn.BatchNorm3d, BatchNorm3d))
        if bn is None or len(bn_node.users) != 1 or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        conv_node = bn_node.args[0]
        if not isinstance(conv_node, torch.fx.Node):
            continue
        conv = module_of(conv_node, (torch.nn.Conv3d,))
        if conv is None or len(conv_node.users) != 1 or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        with graph.inserting_before(relu):
            fused = graph.call_function(conv_bn_relu3d, (graph.get_attr(conv_node.target),
                                                          graph.get_attr(bn_node.target), conv_node.args[0]))
        relu.replace_all_uses_with(fused)
        for n in (relu, bn_node, conv_node):
            graph.erase_node(n)
        found = True
    if not found:
        return False
    graph.lint()
    code = torch.fx.GraphModule(module, graph)
    # The traced forward, bound to the module itself: its submodules, parameters and state_dict
    # keys stay exactly as they were.
    module.forward = types.MethodType(type(code).forward, module)
    return True


def convert(module, fuse=True):
    """volfuse for every BatchNorm3d and (fuse=True) Conv3d -> BatchNorm3d -> ReLU of `module`
    (itself included, at any depth), in place; returns the module (a new one only when `module`
    itself is a torch.nn.BatchNorm3d or a torch.ao.nn.intrinsic.ConvBnReLU3d).

    - torch.nn.BatchNorm3d becomes a volfuse.BatchNorm3d sharing its parameters, buffers and
      mode (subclasses with a forward of their own are left alone);
    - torch.ao.nn.intrinsic.ConvBnReLU3d becomes a volfuse.ConvBnReLU3d (same children);
    - in each module's own forward (nn.Sequential's included), traced by torch.fx with its
      submodules as calls, a Conv3d whose output only feeds a BatchNorm3d whose output only
      feeds a ReLU (torch.relu, F.relu, Tensor.relu, nn.ReLU) runs as volfuse's fused block:
      the module's forward becomes the traced one with that rewrite; submodules, parameters and
      state_dict keys stay the same.  A forward fx cannot trace, or whose traced code changes
      with train/eval, keeps its own (its BatchNorm3d still run volfuse)."""
    if type(module) is torch.nn.BatchNorm3d:
        return BatchNorm3d.from_module(module)
    if fuse and type(module) is torch.ao.nn.intrinsic.ConvBnReLU3d:
        return ConvBnReLU3d.from_module(module)
    for name, child in module.named_children():
        new = convert(child, fuse)
        if new is not child:
            setattr(module, name, new)
    if fuse and not isinstance(module, ConvBnReLU3d) and any(True for _ in module.children()):
        _fuse_forward(module)
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
