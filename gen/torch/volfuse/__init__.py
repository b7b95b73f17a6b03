"""volfuse inside PyTorch: drop-in modules whose forward and backward run volfuse's kernels.

    import volfuse
    bn = volfuse.BatchNorm3d(64)          # a torch.nn.BatchNorm3d, computed by volfuse
    model = volfuse.convert(model)        # every torch.nn.BatchNorm3d of a model, in place

The operators live in the native library next to this file (_volfuse_ops.so, built from
gen/torch/ops.cpp) and are registered as torch.ops.volfuse.*; docs/torch.md says what is
supported and what falls back to PyTorch.
"""
import os

import torch

__all__ = ["BatchNorm3d", "convert", "ops_library"]

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
        # As torch.nn.modules.batchnorm._BatchNorm.forward, except that num_batches_tracked
        # is counted only once the call succeeded (a failed call changes nothing).
        count = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1) if count else 0.0
        else:
            factor = self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if batch_stats:
            size = input.size()
            values = size[0] * size[2] * size[3] * size[4]
            if values == 1:
                raise ValueError("Expected more than 1 value per channel when training, got input size {}".format(size))
        use_running = not self.training or self.track_running_stats
        out, _ = torch.ops.volfuse.batch_norm(
            input, self.weight, self.bias,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            batch_stats, factor, self.eps, False)
        if count:
            self.num_batches_tracked.add_(1)
        return out

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
