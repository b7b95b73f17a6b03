#!/usr/bin/env python3
"""Golden fixture for the end-to-end VideoActionRecognizer (gen/examples/): PyTorch 1.13's
model (the seed's layers) with weights and input from the integer formulas below (repeated in
tests/test_e2e.cpp), input [2, 3, 8, 32, 32]: the logits of a training forward, the running
statistics it leaves, then the logits of an eval forward.  Float32 values as 8 hex digits.
Usage: make_e2e_golden.py tests/golden/video_action_recognizer.txt"""
import struct
import sys

import torch

from seed_models import VideoActionRecognizer

torch.set_num_threads(1)


def pattern(n, a, b, m, center, scale):
    return torch.tensor([((i * a + b) % m - center) / scale for i in range(n)], dtype=torch.float32)


def hexs(t):
    vals = t.detach().contiguous().reshape(-1).tolist()
    return " ".join("%08x" % struct.unpack("<I", struct.pack("<f", v))[0] for v in vals)


def main():
    m = VideoActionRecognizer()
    with torch.no_grad():
        for conv, bn in ((m.conv1, m.bn1), (m.conv2, m.bn2)):
            conv.weight.copy_(pattern(conv.weight.numel(), 104729, 7, 263, 131, 4096.0).reshape(conv.weight.shape))
            conv.bias.copy_(pattern(conv.bias.numel(), 31, 5, 17, 8, 16.0))
            c = bn.num_features
            bn.weight.copy_(pattern(c, 17, 3, 13, 6, 8.0) + 1.0)
            bn.bias.copy_(pattern(c, 23, 1, 11, 5, 16.0))
        m.fc.weight.copy_(pattern(400 * 128, 7919, 11, 251, 125, 512.0).reshape(400, 128))
        m.fc.bias.copy_(pattern(400, 13, 3, 19, 9, 64.0))
        x = pattern(2 * 3 * 8 * 32 * 32, 7919, 13, 257, 128, 128.0).reshape(2, 3, 8, 32, 32)
        m.train()
        train = m(x)
        m.eval()
        ev = m(x)
    with open(sys.argv[1], "w") as f:
        f.write("train_logits %d %s\n" % (train.numel(), hexs(train)))
        for name, t in (("bn1_running_mean", m.bn1.running_mean), ("bn1_running_var", m.bn1.running_var),
                        ("bn2_running_mean", m.bn2.running_mean), ("bn2_running_var", m.bn2.running_var)):
            f.write("%s %d %s\n" % (name, t.numel(), hexs(t)))
        f.write("eval_logits %d %s\n" % (ev.numel(), hexs(ev)))


if __name__ == "__main__":
    main()
