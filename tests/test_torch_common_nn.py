"""PyTorch's own BatchNorm3d module tests (torch/testing/_internal/common_nn.py's
new_module_tests, as PyTorch 1.13's test_nn.py runs them) against volfuse.BatchNorm3d:
non-contiguous inputs and grads, pickling, gradcheck and gradgradcheck in float64, repr,
float32/float64 conversion; each case in training and in eval mode (check_eval)."""
import copy
import sys
import types
import unittest

# Debian 12 has no python3-expecttest, which common_utils imports: a stand-in with the one
# method these tests could reach.
try:
    import expecttest  # noqa: F401
except ImportError:
    shim = types.ModuleType("expecttest")
    shim.ACCEPT = False

    class _ExpectTestCase(unittest.TestCase):
        def assertExpectedInline(self, actual, expect, skip=0):
            self.assertEqual(actual, expect)

    shim.TestCase = _ExpectTestCase
    sys.modules["expecttest"] = shim

_argv, sys.argv = sys.argv, sys.argv[:1]  # common_utils parses sys.argv when imported
import torch  # noqa: E402
from torch.testing._internal import common_nn  # noqa: E402
from torch.testing._internal.common_utils import freeze_rng_state  # noqa: E402
sys.argv = _argv

import volfuse  # noqa: E402

torch.set_default_dtype(torch.double)  # as PyTorch 1.13's test_nn.py


class TestBatchNorm3dModule(common_nn.NNTestCase):
    """The helpers test_nn.py's TestNN gives NewModuleTest."""

    def _forward(self, module, input):
        with freeze_rng_state():
            return module(*input) if isinstance(input, tuple) else module(input)

    def _backward(self, module, input, output, grad_output, create_graph=False):
        output.backward(grad_output, retain_graph=True, create_graph=create_graph)
        if isinstance(input, tuple):
            return tuple(i.grad.data if i.grad is not None else None for i in input)
        return input.grad.data if input.grad is not None else None

    def _zero_grad_parameters(self, module):
        for p in module.parameters():
            if p.grad is not None:
                with torch.no_grad():
                    p.grad.zero_()
                p.grad.detach_()

    def _get_parameters(self, module):
        params = list(module.parameters())
        return params, [p.grad for p in params]


def _add(params):
    test = common_nn.NewModuleTest(**params)
    name = test.get_name()
    assert not hasattr(TestBatchNorm3dModule, name), name
    setattr(TestBatchNorm3dModule, name, lambda self, t=test: t(self))


def _eval_constructor(*args, **kwargs):
    m = volfuse.BatchNorm3d(*args, **kwargs)
    m.training = False
    return m


_eval_constructor.__name__ = "BatchNorm3d"

cases = [p for p in common_nn.new_module_tests if p.get("module_name") == "BatchNorm3d"]
assert len(cases) >= 6, "common_nn has fewer BatchNorm3d cases than PyTorch 1.13's six"
for case in cases:
    p = copy.deepcopy(case)
    p.pop("module_name")
    p.pop("decorator", None)
    p["constructor"] = volfuse.BatchNorm3d
    _add(dict(p))
    if "check_eval" in p:
        p["desc"] = p["desc"] + "_eval" if p.get("desc") else "eval"
        p["constructor"] = _eval_constructor
        _add(p)

if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
