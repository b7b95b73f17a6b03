"""torch.ops.volfuse.batch_norm / batch_norm_backward and volfuse.BatchNorm3d against PyTorch:
gradcheck and gradgradcheck in float64 for both layouts volfuse views (contiguous and
channels_last_3d), with and without the fused ReLU, in training and eval; the module equal to
torch.nn.BatchNorm3d step by step (float32 and float64); bad input raises and changes nothing."""
import io
import unittest

import torch
from torch.autograd import gradcheck, gradgradcheck

import volfuse

ops = torch.ops.volfuse


def bn_fn(training, relu, running, layout):
    """(x, weight, bias) -> output, through the op; running: (mean, var) buffers or None."""
    def f(x, w, b):
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        rm, rv = (running[0].clone(), running[1].clone()) if running else (None, None)
        return ops.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, relu)[0]
    return f


class OpGradients(unittest.TestCase):
    def test_gradcheck_and_gradgradcheck(self):
        torch.manual_seed(0)
        for layout in ("contiguous", "channels_last"):
            for relu in (False, True):
                for training in (True, False):
                    for affine in (True, False):
                        with self.subTest(layout=layout, relu=relu, training=training, affine=affine):
                            C = 3
                            x = torch.randn(2, C, 3, 2, 3, dtype=torch.double, requires_grad=True)
                            w = (torch.rand(C, dtype=torch.double) + 0.5).requires_grad_() if affine else None
                            b = torch.randn(C, dtype=torch.double).requires_grad_() if affine else None
                            running = (torch.randn(C, dtype=torch.double) * 0.1,
                                       torch.rand(C, dtype=torch.double) + 0.5)
                            f = bn_fn(training, relu, None if training and not affine else running, layout)
                            args = (x, w, b)
                            self.assertTrue(gradcheck(f, args, check_batched_grad=False))
                            self.assertTrue(gradgradcheck(f, args, check_batched_grad=False))

    def test_second_order_when_grad_output_depends_on_input(self):
        # gradgradcheck feeds an independent grad_output; a loss of the output (y * y) makes
        # grad_output a function of the input too, so the input's second-order grad has a path
        # through grad_output as well as the direct one: each must be counted once.
        torch.manual_seed(0)
        C = 4
        x = torch.randn(2, C, 3, 4, 5, dtype=torch.double)
        w, b = torch.rand(C, dtype=torch.double) + 0.5, torch.randn(C, dtype=torch.double)
        rm, rv = torch.randn(C, dtype=torch.double) * 0.1, torch.rand(C, dtype=torch.double) + 0.5
        for layout in ("contiguous", "channels_last"):
            for training in (True, False):
                for relu in (False, True):
                    with self.subTest(layout=layout, training=training, relu=relu):
                        grads = []
                        for impl in ("volfuse", "torch"):
                            xx = x.clone().requires_grad_()
                            ww = w.clone().requires_grad_()
                            xin = xx.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else xx
                            if impl == "volfuse":
                                y = ops.batch_norm(xin, ww, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, relu)[0]
                            else:
                                y = torch.nn.functional.batch_norm(xin, rm.clone(), rv.clone(), ww, b, training)
                                y = torch.relu(y) if relu else y
                            first = torch.autograd.grad((y * y).sum(), [xx, ww], create_graph=True)
                            grads.append(torch.autograd.grad(sum((g * g).sum() for g in first), [xx, ww]))
                        for a, r in zip(*grads):
                            torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-9)

    def test_torchscript_calls_the_same_op(self):
        @torch.jit.script
        def scripted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.ops.volfuse.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, True)[0]
        x = torch.randn(2, 4, 3, 3, 3)
        w, b = torch.rand(4) + 0.5, torch.randn(4)
        ref = torch.relu(torch.nn.functional.batch_norm(x, None, None, w, b, True))
        torch.testing.assert_close(scripted(x, w, b), ref, rtol=1e-5, atol=1e-5)


def clone_pair(C, dtype, **kw):
    ref = torch.nn.BatchNorm3d(C, **kw).to(dtype)
    with torch.no_grad():
        if ref.affine:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    vol = volfuse.BatchNorm3d(C, **kw).to(dtype)
    vol.load_state_dict(ref.state_dict())
    return ref, vol


class ModuleEqualsTorch(unittest.TestCase):
    def test_steps_match_torch(self):
        torch.manual_seed(1)
        for dtype, rtol, atol in ((torch.float32, 1e-4, 1e-5), (torch.float64, 1e-10, 1e-12)):
            for kw in ({}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}):
                for layout in (torch.contiguous_format, torch.channels_last_3d):
                    with self.subTest(dtype=dtype, kw=kw, layout=layout):
                        ref, vol = clone_pair(5, dtype, **kw)
                        opt_r = torch.optim.SGD(ref.parameters(), lr=0.1) if ref.affine else None
                        opt_v = torch.optim.SGD(vol.parameters(), lr=0.1) if vol.affine else None
                        for step in range(4):
                            if step == 3:
                                ref.eval(), vol.eval()
                            x = (torch.randn(3, 5, 4, 3, 5, dtype=dtype) * 2 + 1).to(memory_format=layout)
                            xr, xv = x.clone().requires_grad_(), x.clone().requires_grad_()
                            yr, yv = ref(xr), vol(xv)
                            g = torch.randn_like(yr)
                            yr.backward(g), yv.backward(g)
                            torch.testing.assert_close(yv, yr, rtol=rtol, atol=atol)
                            torch.testing.assert_close(xv.grad, xr.grad, rtol=rtol, atol=atol * 10)
                            for a, b in zip(vol.state_dict().values(), ref.state_dict().values()):
                                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
                            if opt_r:
                                for p, q in zip(vol.parameters(), ref.parameters()):
                                    torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol * 100)
                                opt_r.step(), opt_v.step()
                                opt_r.zero_grad(), opt_v.zero_grad()

    def test_is_a_torch_batchnorm(self):
        ref, vol = clone_pair(4, torch.float32, momentum=0.3, eps=1e-3)
        self.assertIsInstance(vol, torch.nn.BatchNorm3d)
        self.assertEqual(repr(vol), repr(ref))
        self.assertEqual(list(vol.state_dict().keys()), list(ref.state_dict().keys()))
        buf = io.BytesIO()
        torch.save(vol, buf)
        buf.seek(0)
        again = torch.load(buf)
        self.assertIs(type(again), volfuse.BatchNorm3d)
        x = torch.randn(2, 4, 3, 3, 3)
        torch.testing.assert_close(again.eval()(x), vol.eval()(x))


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


class BadInput(unittest.TestCase):
    def assert_unchanged(self, m, before):
        for k, v in m.state_dict().items():
            self.assertTrue(torch.equal(v, before[k]), k)

    def test_errors_change_nothing(self):
        m = volfuse.BatchNorm3d(4)
        m(torch.randn(2, 4, 3, 3, 3))
        before = snapshot(m)
        with self.assertRaisesRegex(ValueError, "expected 5D input"):
            m(torch.randn(2, 4, 3, 3))
        with self.assertRaisesRegex(RuntimeError, "running_mean should contain 3 elements not 4"):
            m(torch.randn(2, 3, 3, 3, 3))
        with self.assertRaisesRegex(ValueError, "Expected more than 1 value per channel when training"):
            m(torch.randn(1, 4, 1, 1, 1))
        with self.assertRaisesRegex(RuntimeError, "expected weight to have dtype Float"):
            ops.batch_norm(torch.randn(2, 4, 3, 3, 3), m.weight.double(), None, None, None, True, 0.1, 1e-5)
        with self.assertRaisesRegex(RuntimeError, "input has dtype Int"):
            ops.batch_norm(torch.ones(2, 4, 3, 3, 3, dtype=torch.int32), None, None, m.running_mean,
                           m.running_var, True, 0.1, 1e-5)
        with self.assertRaises((RuntimeError, NotImplementedError)):  # no volfuse kernel off the CPU
            ops.batch_norm(torch.randn(2, 4, 3, 3, 3, device="meta"), None, None, None, None, True, 0.1, 1e-5)
        self.assert_unchanged(m, before)

    def test_strides_volfuse_cannot_view_are_copied(self):
        ref, vol = clone_pair(3, torch.float64)
        x = torch.randn(2, 3, 4, 6, 5, dtype=torch.float64).transpose(2, 4)  # neither layout
        self.assertFalse(x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d))
        torch.testing.assert_close(vol(x), ref(x), rtol=1e-12, atol=1e-12)
        e = torch.randn(1, 3, 1, 1, 1, dtype=torch.float64).expand(2, 3, 4, 4, 4)  # stride 0
        torch.testing.assert_close(vol(e), ref(e), rtol=1e-12, atol=1e-12)


class SyncOperators(unittest.TestCase):
    """SyncBatchNorm's local-phase operators called directly, one process (the gathered
    messages are this process's own): BatchNorm's results; every bad argument raises and
    changes no buffer (tests/test_torch_sync.py runs them over gloo)."""

    def setUp(self):
        torch.manual_seed(3)
        self.x = torch.randn(2, 3, 3, 4, 2, dtype=torch.double, requires_grad=True)
        self.w = torch.rand(3, dtype=torch.double) + 0.5
        self.b = torch.randn(3, dtype=torch.double)
        self.rm, self.rv = torch.zeros(3, dtype=torch.double), torch.ones(3, dtype=torch.double)

    def test_one_process_equals_batch_norm(self):
        for relu in (False, True):
            rm, rv = self.rm.clone(), self.rv.clone()
            msg = ops.sync_batch_norm_message(self.x, self.w, self.b, rm, rv, 1e-5)
            self.assertEqual((msg.dtype, msg.shape), (torch.float64, (7,)))
            y, reserve = ops.sync_batch_norm(self.x.detach(), self.w, self.b, rm, rv, msg[None], 0.1, 1e-5, relu)
            ref_rm, ref_rv = self.rm.clone(), self.rv.clone()
            ref = torch.nn.functional.batch_norm(self.x, ref_rm, ref_rv, self.w, self.b, True, 0.1, 1e-5)
            if relu:
                ref = ref.relu()
            torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rm, ref_rm, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(rv, ref_rv, rtol=1e-12, atol=1e-12)
            g = torch.randn_like(y)
            count = int(msg[0].item())
            sums = ops.sync_batch_norm_backward_message(g, self.x.detach(), self.w, reserve, count, relu, 1e-5)
            dx, dw, db = ops.sync_batch_norm_backward(g, self.x.detach(), self.w, reserve, count, sums[None], 0, relu,
                                                      1e-5, [True, True, True])
            w, b = self.w.clone().requires_grad_(), self.b.clone().requires_grad_()
            out = torch.nn.functional.batch_norm(self.x, None, None, w, b, True, 0.1, 1e-5)
            rx, rw, rb = torch.autograd.grad(out.relu() if relu else out, (self.x, w, b), g)
            for got, want in ((dx, rx), (dw, rw), (db, rb)):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    def test_zero_channels(self):
        x = torch.randn(2, 0, 3, 2, 2, dtype=torch.double)
        msg = ops.sync_batch_norm_message(x, None, None, None, None, 1e-5)
        self.assertEqual(msg.tolist(), [24.0])  # the count alone
        y, reserve = ops.sync_batch_norm(x, None, None, None, None, msg[None], 0.1, 1e-5)
        self.assertEqual(y.shape, x.shape)
        sums = ops.sync_batch_norm_backward_message(y, x, None, reserve, 24, False, 1e-5)
        self.assertEqual(sums.numel(), 0)
        dx, _, _ = ops.sync_batch_norm_backward(y, x, None, reserve, 24, sums[None], 0, False, 1e-5,
                                                [True, False, False])
        self.assertEqual(dx.shape, x.shape)
        with self.assertRaisesRegex(RuntimeError, "gathered has 2 values for 0 channels"):
            ops.sync_batch_norm_backward(y, x, None, reserve, 24, torch.zeros(2, dtype=torch.double), 0, False, 1e-5,
                                         [True, False, False])

    def test_bad_arguments_raise_and_change_nothing(self):
        x = self.x.detach()
        msg = ops.sync_batch_norm_message(x, self.w, self.b, self.rm, self.rv, 1e-5)
        torn, negative = msg[:-1][None], msg.clone()[None]
        negative[0, 0] = -4
        bad_forward = {
            "expected 5D input": lambda: ops.sync_batch_norm_message(x[0], self.w, self.b, self.rm, self.rv, 1e-5),
            "weight should contain 3 elements": lambda: ops.sync_batch_norm_message(
                x, self.w[:2], self.b, self.rm, self.rv, 1e-5),
            "gathered must be a contiguous CPU Double tensor": lambda: ops.sync_batch_norm(
                x, self.w, self.b, self.rm, self.rv, msg[None].float(), 0.1, 1e-5),
            "not a positive multiple of the message size 7": lambda: ops.sync_batch_norm(
                x, self.w, self.b, self.rm, self.rv, torn, 0.1, 1e-5),
            "has no valid count": lambda: ops.sync_batch_norm(
                x, self.w, self.b, self.rm, self.rv, negative, 0.1, 1e-5),
        }
        for text, call in bad_forward.items():
            with self.subTest(text):
                with self.assertRaisesRegex(RuntimeError, text):
                    call()
                self.assertTrue(torch.equal(self.rm, torch.zeros(3, dtype=torch.double)))
                self.assertTrue(torch.equal(self.rv, torch.ones(3, dtype=torch.double)))
        y, reserve = ops.sync_batch_norm(x, self.w, self.b, None, None, msg[None], 0.1, 1e-5)
        g = torch.randn_like(y)
        sums = ops.sync_batch_norm_backward_message(g, x, self.w, reserve, 48, False, 1e-5)
        bad_backward = {
            "is not one of the 1 processes gathered": lambda: ops.sync_batch_norm_backward(
                g, x, self.w, reserve, 48, sums[None], 1, False, 1e-5, [True, True, True]),
            "reserve is not the forward's": lambda: ops.sync_batch_norm_backward_message(
                g, x, self.w, reserve[:3], 48, False, 1e-5),
            "grad_output must be a CPU tensor of the input's dtype and shape": lambda: ops.sync_batch_norm_backward(
                g[:1], x, self.w, reserve, 48, sums[None], 0, False, 1e-5, [True, True, True]),
            "negative global count": lambda: ops.sync_batch_norm_backward_message(
                g, x, self.w, reserve, -1, False, 1e-5),
        }
        for text, call in bad_backward.items():
            with self.subTest(text):
                with self.assertRaisesRegex(RuntimeError, text):
                    call()


class OutputMemory(unittest.TestCase):
    def test_outputs_reuse_freed_memory_and_behave_as_tensors(self):
        # gen/torch/output_pool.hpp: an output freed by PyTorch serves the next request of its
        # size (no fresh pages to fault in); reused memory holds the old values, which every
        # output element overwrites.
        x = torch.randn(2, 4, 3, 5, 6)
        w, b = torch.rand(4) + 0.5, torch.randn(4)
        y, _ = ops.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False)
        first = y.data_ptr()
        want = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        y.fill_(float("nan"))
        del y
        y2, _ = ops.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False)
        self.assertEqual(y2.data_ptr(), first)
        torch.testing.assert_close(y2, want, rtol=1e-5, atol=1e-5)
        # An ordinary tensor otherwise: resizable, views, pickling.
        v = y2[:, 1]
        self.assertEqual(v.data_ptr(), y2.data_ptr() + 3 * 5 * 6 * 4)
        buf = io.BytesIO()
        torch.save(y2, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf), y2, rtol=0, atol=0)
        y2.resize_(1000)
        self.assertEqual(y2.shape, (1000,))


if __name__ == "__main__":
    unittest.main(verbosity=2)
