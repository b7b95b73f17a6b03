"""torch.ops.volfuse.conv3d / conv3d_backward / conv_bn_relu3d, volfuse.ConvBnReLU3d and
volfuse.convert's fusion, against PyTorch; float64 through the same kernel templates
(gradcheck, gradgradcheck).

Float32 results are compared with PyTorch computing in float64 from the same (float32) values:
volfuse's error must stay within 4x PyTorch float32's own error plus 1e-5 of the result's norm
(the criterion of the seed tests).  Derivatives of every order come from volfuse's ops, so the
second-order checks compare torch.autograd.grad(create_graph=True) through them with PyTorch's
double backward in float64."""
import copy
import unittest

import torch
import torch.nn.functional as F

import volfuse

ops = torch.ops.volfuse

GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, input sizes D, H, W)
    (3, 5, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (4, 5, 6)),
    (4, 6, (3, 2, 3), (1, 2, 1), (1, 0, 2), (1, 1, 2), (5, 6, 7)),
    (2, 17, (1, 1, 1), (2, 2, 2), (0, 0, 0), (1, 1, 1), (3, 4, 5)),
    (16, 8, (3, 3, 3), (2, 1, 2), (1, 1, 1), (1, 1, 1), (5, 4, 6)),
]


def as_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else t


class Close:
    """assert_close64(volfuse32, torch32, torch64): volfuse's float32 within 4x torch's float32
    error (both against the float64 result) plus 1e-5 of the norm."""

    def assert_close64(self, v, t32, r, what=""):
        if r is None:
            self.assertIsNone(v, what)
            return
        r = r.double()
        ev, et = (v.double() - r).norm().item(), (t32.double() - r).norm().item()
        self.assertLessEqual(ev, 4 * et + 1e-5 * r.norm().item() + 1e-12, what)


class Conv3dOps(unittest.TestCase, Close):
    def test_forward_and_backward(self):
        torch.manual_seed(0)
        for (ci, co, k, s, p, d, size) in GEOMETRIES:
            for layout in ("contiguous", "channels_last", "strided"):
                for bias in (True, False):
                    with self.subTest(geometry=(ci, co, k, s, p, d), layout=layout, bias=bias):
                        x = torch.randn(2, ci, *size)
                        if layout == "strided":  # a view volfuse cannot take as it is: copied
                            x = torch.randn(2, ci, size[0], size[1], 2 * size[2])[..., ::2]
                        else:
                            x = as_layout(x, layout)
                        w = torch.randn(co, ci, *k) / (ci * k[0] * k[1] * k[2]) ** 0.5
                        b = torch.randn(co) if bias else None
                        args = (list(s), list(p), list(d))
                        leaves32 = [t.clone().requires_grad_() for t in (x, w)] + (
                            [b.clone().requires_grad_()] if bias else [])
                        leaves_t = [t.clone().requires_grad_() for t in (x, w)] + (
                            [b.clone().requires_grad_()] if bias else [])
                        leaves64 = [t.double().requires_grad_() for t in (x, w)] + (
                            [b.double().requires_grad_()] if bias else [])
                        y = ops.conv3d(leaves32[0], leaves32[1], leaves32[2] if bias else None, *args)
                        yt = F.conv3d(leaves_t[0], leaves_t[1], leaves_t[2] if bias else None, s, p, d)
                        yr = F.conv3d(leaves64[0], leaves64[1], leaves64[2] if bias else None, s, p, d)
                        self.assertEqual(y.shape, yr.shape)
                        self.assertEqual(y.is_contiguous(memory_format=torch.channels_last_3d),
                                         layout == "channels_last" and not y.is_contiguous())
                        self.assert_close64(y, yt, yr, "output")
                        g = torch.randn(yr.shape)
                        gv = torch.autograd.grad(y, leaves32, g)
                        gt = torch.autograd.grad(yt, leaves_t, g)
                        gr = torch.autograd.grad(yr, leaves64, g.double())
                        for name, a, t, r in zip(("input", "weight", "bias"), gv, gt, gr):
                            self.assert_close64(a, t, r, name)

    def test_backward_op_masks(self):
        torch.manual_seed(1)
        x, w = torch.randn(2, 3, 4, 5, 6), torch.randn(4, 3, 3, 3, 3)
        g = torch.randn(2, 4, 4, 5, 6)
        full = ops.conv3d_backward(g, x, w, [1, 1, 1], [1, 1, 1], [1, 1, 1], [True, True, True])
        for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
            with self.subTest(mask=mask):
                part = ops.conv3d_backward(g, x, w, [1, 1, 1], [1, 1, 1], [1, 1, 1], mask)
                for m, a, f in zip(mask, part, full):
                    if m:
                        self.assertTrue(torch.equal(a, f))
                    else:
                        self.assertIsNone(a)

    def test_double_backward(self):
        torch.manual_seed(2)
        for layout in ("contiguous", "channels_last"):
            with self.subTest(layout=layout):
                x = as_layout(torch.randn(2, 3, 4, 5, 6), layout)
                w, b = torch.randn(4, 3, 3, 2, 3) * 0.3, torch.randn(4)
                args = ([1, 2, 1], [1, 0, 1], [1, 1, 2])

                def second(conv, dtype):
                    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
                    y = conv(*leaves)
                    g = torch.ones_like(y).mul_(0.5).requires_grad_()
                    first = torch.autograd.grad((y * y).sum() + (y * g).sum(), leaves + [g], create_graph=True)
                    loss = sum((f * f).sum() for f in first)
                    return torch.autograd.grad(loss, leaves + [g])

                vol = second(lambda a, c, e: ops.conv3d(a, c, e, *args), torch.float32)
                t32 = second(lambda a, c, e: F.conv3d(a, c, e, *args), torch.float32)
                r64 = second(lambda a, c, e: F.conv3d(a, c, e, *args), torch.float64)
                for name, a, t, r in zip(("input", "weight", "bias", "grad_output"), vol, t32, r64):
                    self.assert_close64(a, t, r, name)

    def test_errors(self):
        x, w, b = torch.randn(2, 3, 4, 4, 4), torch.randn(5, 3, 3, 3, 3), torch.randn(5)
        one = [1, 1, 1]
        cases = [
            ("channels", lambda: ops.conv3d(torch.randn(2, 4, 4, 4, 4), w, b, one, one, one),
             "expected input[2, 4, 4, 4, 4] to have 3 channels, but got 4 channels instead"),
            ("4-D input", lambda: ops.conv3d(torch.randn(3, 4, 4, 4), w, b, one, one, one),
             "Expected 5-dimensional input for 5-dimensional weight [5, 3, 3, 3, 3]"),
            ("weight dims", lambda: ops.conv3d(x, torch.randn(5, 3, 3, 3), b, one, one, one), "5-D weight"),
            ("bias size", lambda: ops.conv3d(x, w, torch.randn(4), one, one, one),
             "expected bias to be 1-dimensional with 5 elements"),
            ("dtype mix", lambda: ops.conv3d(x, w.double(), b, one, one, one), "should be the same"),
            ("half", lambda: ops.conv3d(x.half(), w.half(), b.half(), one, one, one), "Float and Double"),
            ("kernel too big", lambda: ops.conv3d(torch.randn(2, 3, 2, 4, 4), w, b, one, [0, 0, 0], one),
             "Kernel size can't be greater than actual input size"),
            ("stride", lambda: ops.conv3d(x, w, b, [0, 1, 1], one, one), "non-positive stride is not supported"),
            ("padding", lambda: ops.conv3d(x, w, b, one, [-1, 0, 0], one), "negative padding is not supported"),
            ("grad_output shape", lambda: ops.conv3d_backward(torch.randn(2, 5, 4, 4, 3), x, w, one, one, one,
                                                              [True, True, True]), "grad_output"),
        ]
        for name, call, message in cases:
            with self.subTest(name):
                with self.assertRaisesRegex(RuntimeError, message.replace("[", r"\[").replace("]", r"\]")):
                    call()


class Float64(unittest.TestCase):
    """The same kernel templates in float64: gradcheck and gradgradcheck on every op, both
    layouts, and the fused block equal to PyTorch's modules in float64."""

    def gradchecks(self, f, args):
        self.assertTrue(torch.autograd.gradcheck(f, args))
        self.assertTrue(torch.autograd.gradgradcheck(f, args))

    def test_conv3d_gradcheck(self):
        torch.manual_seed(10)
        for layout in ("contiguous", "channels_last"):
            for bias in (True, False):
                with self.subTest(layout=layout, bias=bias):
                    x = torch.randn(2, 3, 4, 3, 5, dtype=torch.double, requires_grad=True)
                    w = torch.randn(4, 3, 2, 3, 2, dtype=torch.double, requires_grad=True)
                    b = torch.randn(4, dtype=torch.double, requires_grad=True) if bias else None

                    def f(a, c, *e):
                        return ops.conv3d(as_layout(a, layout), c, e[0] if e else None, [1, 2, 1], [1, 1, 0],
                                          [2, 1, 1])
                    self.gradchecks(f, (x, w, b) if bias else (x, w))

    def test_conv_bn_relu3d_gradcheck(self):
        torch.manual_seed(11)
        for layout in ("contiguous", "channels_last"):
            for training in (True, False):
                with self.subTest(layout=layout, training=training):
                    x = torch.randn(2, 3, 3, 4, 3, dtype=torch.double, requires_grad=True)
                    w = (torch.randn(5, 3, 3, 3, 3, dtype=torch.double) * 0.2).requires_grad_()
                    cb = torch.randn(5, dtype=torch.double, requires_grad=True)
                    g = (torch.rand(5, dtype=torch.double) + 0.5).requires_grad_()
                    b = torch.randn(5, dtype=torch.double, requires_grad=True)
                    rm, rv = torch.randn(5, dtype=torch.double) * 0.1, torch.rand(5, dtype=torch.double) + 0.5

                    def f(a, ww, c, gg, bb):
                        return ops.conv_bn_relu3d(as_layout(a, layout), ww, c, gg, bb, rm.clone(), rv.clone(),
                                                  [1, 1, 1], [1, 1, 1], [1, 1, 1], training, 0.1, 1e-5)[0]
                    self.gradchecks(f, (x, w, cb, g, b))

    def test_block_equals_pytorch(self):
        torch.manual_seed(12)
        conv, bn = torch.nn.Conv3d(3, 6, 3, padding=1).double(), torch.nn.BatchNorm3d(6).double()
        fused = volfuse.ConvBnReLU3d(copy.deepcopy(conv), copy.deepcopy(bn))
        for training in (True, True, False):
            fused.train(training), bn.train(training)
            for layout in ("contiguous", "channels_last"):
                x = as_layout(torch.randn(2, 3, 4, 5, 6, dtype=torch.double), layout).requires_grad_()
                xr = x.detach().clone().requires_grad_()
                y, r = fused(x), torch.relu(bn(conv(xr)))
                torch.testing.assert_close(y, r, rtol=1e-10, atol=1e-12)
                g = torch.randn_like(r)
                a = torch.autograd.grad(y, [x] + list(fused.parameters()), g)
                c = torch.autograd.grad(r, [xr] + list(conv.parameters()) + list(bn.parameters()), g)
                for u, v in zip(a, c):
                    torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fused[1].running_var, bn.running_var, rtol=1e-12, atol=1e-14)


def block_reference(conv, bn, x, dtype):
    """relu(bn(conv(x))) by PyTorch's modules in dtype (copies: the originals are untouched)."""
    c, n = copy.deepcopy(conv).to(dtype), copy.deepcopy(bn).to(dtype)
    return c, n, torch.relu(n(c(x.to(dtype))))


class FusedBlock(unittest.TestCase, Close):
    def make(self, ci=3, co=6, k=3, stride=1, padding=1, dilation=1, bias=True, **bn_args):
        conv = torch.nn.Conv3d(ci, co, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
        bn = torch.nn.BatchNorm3d(co, **bn_args)
        with torch.no_grad():
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            if bn.track_running_stats:
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
        return conv, bn

    def test_train_and_eval_match_pytorch(self):
        torch.manual_seed(3)
        configs = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                   dict(bias=False, stride=2, dilation=2, padding=2)]
        for cfg in configs:
            for layout in ("contiguous", "channels_last"):
                with self.subTest(config=cfg, layout=layout):
                    conv_args = {k: v for k, v in cfg.items() if k in ("bias", "stride", "dilation", "padding")}
                    bn_args = {k: v for k, v in cfg.items() if k not in conv_args}
                    conv, bn = self.make(**conv_args, **bn_args)
                    fused = volfuse.ConvBnReLU3d(copy.deepcopy(conv), copy.deepcopy(bn))
                    t32c, t32b = copy.deepcopy(conv), copy.deepcopy(bn)
                    r64c, r64b = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
                    for step, training in enumerate((True, True, False, True)):
                        for m in (fused, t32b, r64b):
                            m.train(training)
                        x = as_layout(torch.randn(2, 3, 5, 6, 7), layout)
                        leaves = [x.clone().requires_grad_()]
                        lt = [x.clone().requires_grad_()]
                        lr = [x.double().requires_grad_()]
                        y = fused(leaves[0])
                        yt = torch.relu(t32b(t32c(lt[0])))
                        yr = torch.relu(r64b(r64c(lr[0])))
                        self.assert_close64(y, yt, yr, "output, step %d" % step)
                        self.assertEqual(y.is_contiguous(), layout == "contiguous")
                        g = torch.randn(yr.shape)
                        pv = [leaves[0]] + list(fused.parameters())
                        pt = [lt[0]] + list(t32c.parameters()) + list(t32b.parameters())
                        pr = [lr[0]] + list(r64c.parameters()) + list(r64b.parameters())
                        gv = torch.autograd.grad(y, pv, g)
                        gt = torch.autograd.grad(yt, pt, g)
                        gr = torch.autograd.grad(yr, pr, g.double())
                        for i, (a, t, r) in enumerate(zip(gv, gt, gr)):
                            self.assert_close64(a, t, r, "grad %d, step %d" % (i, step))
                        for name in ("running_mean", "running_var"):
                            if getattr(r64b, name) is not None:
                                self.assert_close64(getattr(fused[1], name), getattr(t32b, name),
                                                    getattr(r64b, name), name)
                        if bn.track_running_stats:
                            self.assertEqual(int(fused[1].num_batches_tracked), int(r64b.num_batches_tracked))

    def test_inference_under_no_grad_is_folded_and_equal(self):
        torch.manual_seed(4)
        conv, bn = self.make()
        fused = volfuse.ConvBnReLU3d(copy.deepcopy(conv), copy.deepcopy(bn)).eval()
        for layout in ("contiguous", "channels_last"):
            x = as_layout(torch.randn(2, 3, 5, 6, 7), layout)
            with torch.no_grad():
                y = fused(x)
                yt = torch.relu(bn.eval()(conv(x)))
                yr = torch.relu(copy.deepcopy(bn).double()(copy.deepcopy(conv).double()(x.double())))
            self.assert_close64(y, yt, yr, layout)
        # inference mode as well (no autograd kernel at all)
        with torch.inference_mode():
            self.assertEqual(fused(x).shape, yr.shape)

    def test_double_backward(self):
        torch.manual_seed(5)
        conv, bn = self.make()
        x = torch.randn(2, 3, 4, 5, 6)

        def second(f, mods, dtype):
            xx = x.to(dtype).requires_grad_()
            params = [p for m in mods for p in m.parameters()]
            y = f(xx)
            first = torch.autograd.grad((y * y).sum(), [xx] + params, create_graph=True)
            return torch.autograd.grad(sum((a * a).sum() for a in first), [xx] + params)

        for training in (True, False):
            with self.subTest(training=training):
                fused = volfuse.ConvBnReLU3d(copy.deepcopy(conv), copy.deepcopy(bn)).train(training)
                c32, b32 = copy.deepcopy(conv), copy.deepcopy(bn).train(training)
                c64, b64 = copy.deepcopy(conv).double(), copy.deepcopy(bn).double().train(training)
                vol = second(fused, [fused], torch.float32)
                t32 = second(lambda a: torch.relu(b32(c32(a))), [c32, b32], torch.float32)
                r64 = second(lambda a: torch.relu(b64(c64(a))), [c64, b64], torch.float64)
                for i, (a, t, r) in enumerate(zip(vol, t32, r64)):
                    self.assert_close64(a, t, r, "second-order grad %d" % i)

    def test_module_like_torch_ao(self):
        conv, bn = self.make()
        ao = torch.ao.nn.intrinsic.ConvBnReLU3d(copy.deepcopy(conv), copy.deepcopy(bn), torch.nn.ReLU())
        fused = volfuse.ConvBnReLU3d(conv, bn)
        self.assertIs(fused[0], conv)
        self.assertIs(fused[1].weight, bn.weight)  # the same tensors: optimizers keep working
        self.assertEqual(list(fused.state_dict()), list(ao.state_dict()))
        self.assertEqual(repr(fused).split("\n")[1:], repr(ao).split("\n")[1:])
        fused.load_state_dict(ao.state_dict())
        from_ao = volfuse.convert(ao)
        self.assertIs(type(from_ao), volfuse.ConvBnReLU3d)
        self.assertIs(type(from_ao[1]), volfuse.BatchNorm3d)
        with self.assertRaisesRegex(ValueError, "BatchNorm3d has 4 features but the Conv3d has 6"):
            volfuse.ConvBnReLU3d(conv, torch.nn.BatchNorm3d(4))
        with self.assertRaisesRegex(TypeError, "conv must be a torch.nn.Conv3d"):
            volfuse.ConvBnReLU3d(torch.nn.Conv2d(3, 6, 3), bn)

    def test_falls_back_where_the_fused_op_does_not_apply(self):
        torch.manual_seed(6)
        for name, conv, x in [
            ("groups", torch.nn.Conv3d(3, 6, 3, padding=1, groups=3), torch.randn(2, 3, 4, 5, 6)),
            ("padding_mode", torch.nn.Conv3d(3, 6, 3, padding=1, padding_mode="reflect"), torch.randn(2, 3, 4, 5, 6)),
            ("padding='same'", torch.nn.Conv3d(3, 6, 3, padding="same"), torch.randn(2, 3, 4, 5, 6)),
        ]:
            with self.subTest(name):
                bn = torch.nn.BatchNorm3d(6).to(x.dtype)
                fused = volfuse.ConvBnReLU3d(copy.deepcopy(conv), copy.deepcopy(bn))
                torch.testing.assert_close(fused(x), torch.relu(bn(conv(x))))

    def test_errors_change_nothing(self):
        conv, bn = self.make()
        fused = volfuse.ConvBnReLU3d(conv, bn)
        state = {k: v.clone() for k, v in fused.state_dict().items()}
        for name, x, error in [
            ("channels", torch.randn(2, 4, 5, 5, 5), RuntimeError),
            ("too small", torch.randn(2, 3, 1, 1, 1), RuntimeError),  # kernel 3, padding 1: outputs 1x1x1, N 2: ok
            ("one value per channel", torch.randn(1, 3, 1, 1, 1), ValueError),
        ]:
            with self.subTest(name):
                if name == "too small":
                    fused(x)  # 2 values per channel: valid
                    state = {k: v.clone() for k, v in fused.state_dict().items()}
                    continue
                with self.assertRaises(error):
                    fused(x)
                for k, v in fused.state_dict().items():
                    self.assertTrue(torch.equal(v, state[k]), k)
        # the op itself: bad per-channel tensors raise before anything runs
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        with self.assertRaisesRegex(RuntimeError, "running_mean should contain 6 elements not 5"):
            ops.conv_bn_relu3d(torch.randn(2, 3, 4, 4, 4), conv.weight, conv.bias, bn.weight, bn.bias,
                               torch.zeros(5), rv, [1] * 3, [1] * 3, [1] * 3, True, 0.1, 1e-5)
        self.assertTrue(torch.equal(rv, bn.running_var))


class Convert(unittest.TestCase):
    def test_sequential_and_nested(self):
        torch.manual_seed(7)
        model = torch.nn.Sequential(
            torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
            torch.nn.Sequential(torch.nn.Conv3d(4, 4, 1), torch.nn.BatchNorm3d(4), torch.nn.ReLU(inplace=True)),
            torch.nn.Conv3d(4, 3, 1), torch.nn.BatchNorm3d(3))  # no ReLU: BatchNorm3d only
        plain = copy.deepcopy(model)
        keys = list(model.state_dict())
        out = volfuse.convert(model)
        self.assertIs(out, model)
        self.assertEqual(list(model.state_dict()), keys)
        self.assertIn("forward", vars(model))
        self.assertIn("forward", vars(model[3]))
        self.assertIs(type(model[5]), volfuse.BatchNorm3d)
        x = torch.randn(2, 2, 4, 5, 6)
        torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-5)
        model.eval(), plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=1e-4, atol=1e-5)

    def test_patterns_that_are_not_fused(self):
        class Shared(torch.nn.Module):  # the conv output also feeds something else
            def __init__(self):
                super().__init__()
                self.conv, self.bn = torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4)

            def forward(self, x):
                z = self.conv(x)
                return torch.relu(self.bn(z)) + z

        class ModeDependent(torch.nn.Module):  # traced code would freeze one mode
            def __init__(self):
                super().__init__()
                self.conv, self.bn = torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4)

            def forward(self, x):
                y = torch.relu(self.bn(self.conv(x)))
                return y * 2 if self.training else y

        class Untraceable(torch.nn.Module):  # data-dependent control flow
            def __init__(self):
                super().__init__()
                self.conv, self.bn = torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.BatchNorm3d(4)

            def forward(self, x):
                if x.sum() > 0:
                    x = -x
                return torch.relu(self.bn(self.conv(x)))

        for cls in (Shared, ModeDependent, Untraceable):
            with self.subTest(cls.__name__):
                torch.manual_seed(8)
                m = cls()
                plain = copy.deepcopy(m)
                volfuse.convert(m)
                self.assertNotIn("forward", vars(m))
                self.assertIs(type(m.bn), volfuse.BatchNorm3d)
                x = torch.randn(2, 2, 3, 4, 5)
                torch.testing.assert_close(m(x), plain(x), rtol=1e-4, atol=1e-5)

    def test_functional_relu_forms(self):
        class Forms(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.c = torch.nn.ModuleList(torch.nn.Conv3d(2, 2, 1) for _ in range(3))
                self.b = torch.nn.ModuleList(torch.nn.BatchNorm3d(2) for _ in range(3))

            def forward(self, x):
                x = F.relu(self.b[0](self.c[0](x)))
                x = self.b[1](self.c[1](x)).relu()
                return torch.relu(self.b[2](self.c[2](x)))

        m = Forms()
        plain = copy.deepcopy(m)
        volfuse.convert(m)
        import inspect
        self.assertEqual(inspect.getsource(m.forward).count("conv_bn_relu3d("), 3)
        x = torch.randn(2, 2, 3, 4, 5)
        torch.testing.assert_close(m(x), plain(x), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    unittest.main(verbosity=2)
