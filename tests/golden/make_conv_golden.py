#!/usr/bin/env python3
"""Writes golden fixtures for volfuse's Conv3d from PyTorch (Debian's python3-torch 1.13).

Usage: make_conv_golden.py tests/golden/conv3d tests/golden/conv_bn_relu3d

The seed's conv layers on small spatial sizes.  Inputs are not stored: x, weight, bias and
grad_output come from integer formulas (below, repeated in tests/test_conv_golden.cpp) whose
values are exact in float32.  Written:
  <out>.txt  one line per case: name in out kd kh kw sd sh sw pd ph pw dd dh dw bias N D H W,
             then the float counts of y, grad_input, grad_weight, grad_bias
  <out>.bin  for each case in order, y, grad_input, grad_weight, grad_bias as little-endian
             float32, logical NCDHW / PyTorch layouts
The block fixtures (second argument) run each layer as Conv3d -> BatchNorm3d -> ReLU: a
training step (forward, then backward of grad_output) and an eval step, with BN parameters and
running statistics from formulas too; per case and step, in order: y, grad_input, conv
grad_weight, conv grad_bias, bn grad_weight, bn grad_bias, running_mean, running_var (the
grads accumulate over the two steps, as in PyTorch; the .txt line ends with the counts).
"""
import struct
import sys

import torch

torch.set_num_threads(1)

# name, in, out, kernel, stride, padding, dilation, bias, input N, D, H, W
CASES = [
    ("video_conv1", 3, 64, (7, 7, 7), (2, 2, 2), (3, 3, 3), (1, 1, 1), True, (1, 8, 12, 12)),
    ("video_conv2", 64, 128, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), True, (1, 3, 4, 5)),
    ("medical_conv1", 1, 32, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), True, (2, 5, 6, 7)),
    ("medical_conv2", 32, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), False, (1, 4, 5, 6)),
]


def pattern(n, a, b, m, center, scale):
    """((i * a + b) % m - center) / scale for i in [0, n): exact in float32."""
    return torch.tensor([((i * a + b) % m - center) / scale for i in range(n)], dtype=torch.float32)


def inputs(cin, cout, k, bias, n, d, h, w, out_shape):
    x = pattern(n * cin * d * h * w, 7919, 13, 257, 128, 128.0).reshape(n, cin, d, h, w)
    wt = pattern(cout * cin * k[0] * k[1] * k[2], 104729, 7, 263, 131, 4096.0).reshape(cout, cin, *k)
    b = pattern(cout, 31, 5, 17, 8, 16.0) if bias else None
    dy = pattern(out_shape.numel(), 15485863, 3, 241, 120, 128.0).reshape(out_shape)
    return x, wt, b, dy


def bn_inputs(c):
    gamma = pattern(c, 17, 3, 13, 6, 8.0) + 1.0
    beta = pattern(c, 23, 1, 11, 5, 16.0)
    rm = pattern(c, 5, 2, 7, 3, 8.0)
    rv = pattern(c, 3, 1, 5, 0, 4.0) + 1.0
    return gamma, beta, rm, rv


def write_block(out):
    lines = []
    blob = bytearray()
    for name, cin, cout, k, s, p, dil, bias, (n, d, h, w) in CASES:
        conv = torch.nn.Conv3d(cin, cout, k, stride=s, padding=p, dilation=dil, bias=bias)
        bn = torch.nn.BatchNorm3d(cout)
        with torch.no_grad():
            shape = conv(torch.zeros(n, cin, d, h, w)).shape
        x, wt, b, dy = inputs(cin, cout, k, bias, n, d, h, w, shape)
        gamma, beta, rm, rv = bn_inputs(cout)
        with torch.no_grad():
            conv.weight.copy_(wt)
            if bias:
                conv.bias.copy_(b)
            bn.weight.copy_(gamma)
            bn.bias.copy_(beta)
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv)
        counts = None
        for train in (True, False):
            bn.train(train)
            xg = x.clone().requires_grad_(True)
            y = torch.relu(bn(conv(xg)))
            y.backward(dy)
            tensors = [y, xg.grad, conv.weight.grad, conv.bias.grad if bias else torch.zeros(0),
                       bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
            for t in tensors:
                vals = t.detach().contiguous().reshape(-1).tolist()
                blob += struct.pack("<%df" % len(vals), *vals)
            counts = [t.numel() for t in tensors]
        fields = [name, cin, cout, *k, *s, *p, *dil, int(bias), n, d, h, w] + counts
        lines.append(" ".join(str(f) for f in fields))
    with open(out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".bin", "wb") as f:
        f.write(blob)


def main():
    write_block(sys.argv[2])
    out = sys.argv[1]
    lines = []
    blob = bytearray()
    for name, cin, cout, k, s, p, dil, bias, (n, d, h, w) in CASES:
        conv = torch.nn.Conv3d(cin, cout, k, stride=s, padding=p, dilation=dil, bias=bias)
        with torch.no_grad():
            shape = conv(torch.zeros(n, cin, d, h, w)).shape
        x, wt, b, dy = inputs(cin, cout, k, bias, n, d, h, w, shape)
        with torch.no_grad():
            conv.weight.copy_(wt)
            if bias:
                conv.bias.copy_(b)
        x.requires_grad_(True)
        y = conv(x)
        y.backward(dy)
        tensors = [y, x.grad, conv.weight.grad, conv.bias.grad if bias else torch.zeros(0)]
        for t in tensors:
            vals = t.detach().contiguous().reshape(-1).tolist()
            blob += struct.pack("<%df" % len(vals), *vals)
        fields = [name, cin, cout, *k, *s, *p, *dil, int(bias), n, d, h, w] + [t.numel() for t in tensors]
        lines.append(" ".join(str(f) for f in fields))
    with open(out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".bin", "wb") as f:
        f.write(blob)


if __name__ == "__main__":
    main()
