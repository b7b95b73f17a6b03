#!/usr/bin/env python3
"""Writes golden fixtures for volfuse's Conv3d from PyTorch (Debian's python3-torch 1.13).

Usage: make_conv_golden.py tests/golden/conv3d

The seed's conv layers on small spatial sizes.  Inputs are not stored: x, weight, bias and
grad_output come from integer formulas (below, repeated in tests/test_conv_golden.cpp) whose
values are exact in float32.  Written:
  <out>.txt  one line per case: name in out kd kh kw sd sh sw pd ph pw dd dh dw bias N D H W,
             then the float counts of y, grad_input, grad_weight, grad_bias
  <out>.bin  for each case in order, y, grad_input, grad_weight, grad_bias as little-endian
             float32, logical NCDHW / PyTorch layouts
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


def main():
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
