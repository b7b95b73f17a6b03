#!/usr/bin/env python3
"""The seed networks' C++ training steps (gen/examples/train_seed_networks.cpp) against PyTorch.

Runs the C++ program with --dump, rebuilds the seed's PyTorch models (VideoActionRecognizer,
MedicalImageAnalyzer: Linear(64^4, 2)) from the initial parameters it wrote, replays the same
SGD steps (torch.optim.SGD with its momentum and weight decay, CrossEntropyLoss, the same input
and targets) in float64 (the reference) and in float32 (PyTorch's own float32 error), and
compares every step's loss and, after the last step, every gradient, every parameter and every
BatchNorm buffer.

Criterion, per tensor: volfuse's error against the float64 reference (2-norm of the difference)
is at most 4x PyTorch float32's error plus 1e-6 of the reference's norm.  Both compute in float32
with different summation orders, so neither is exact; 4x allows for the ReLU and MaxPool
decisions that flip on near-ties (the same ones PyTorch float32 meets) without hiding a wrong
term, which would cost orders of magnitude more.  num_batches_tracked must be equal.

  seed_training.py EXE SCRATCH_DIR [extra arguments for EXE]
"""
import os
import struct
import subprocess
import sys

import numpy as np
import torch

from seed_models import VideoActionRecognizer, MedicalImageAnalyzer

torch.set_num_threads(2)


def read_dump(path):
    out = {}
    with open(path, "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        name = data[i:i + n].decode()
        i += n
        (c,) = struct.unpack_from("<Q", data, i)
        i += 8
        out[name] = np.frombuffer(data, dtype="<f4", count=c, offset=i).copy()
        i += 4 * c
    return out


def run(model_class, d, dtype, input_shape):
    torch.manual_seed(0)
    model = model_class().to(dtype)
    params = dict(model.named_parameters())
    names = sorted(k[5:] for k in d if k.startswith("init/"))
    if sorted(params) != names:
        raise SystemExit("parameter names differ: torch %s, volfuse %s" % (sorted(params), names))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(d["init/" + name]).reshape(p.shape).to(dtype))
    x = torch.from_numpy(d["x"]).to(dtype).reshape(input_shape)
    target = torch.from_numpy(d["target"]).long()
    opt = torch.optim.SGD(model.parameters(), lr=float(d["lr"][0]), momentum=float(d["momentum"][0]),
                          weight_decay=float(d["weight_decay"][0]))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    losses, grads = [], {}
    steps = int(d["steps"][0])
    for step in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        losses.append(loss.item())
        if step + 1 == steps:
            grads = {n: p.grad.detach().double().reshape(-1).clone() for n, p in params.items()}
        opt.step()
    out = {"loss": torch.tensor(losses, dtype=torch.float64)}
    for n, g in grads.items():
        out["grad/" + n] = g
    for n, p in params.items():
        out["param/" + n] = p.detach().double().reshape(-1)
    for n, b in model.named_buffers():
        out["buffer/" + n] = b.detach().double().reshape(-1)
    return out


def compare(title, d, ref, t32):
    failures = 0
    width = max(len(k) for k in ref)
    print("%s: %d tensors; error = ||x - float64 reference||, relative to ||reference||" % (title, len(ref)))
    for key in ref:
        if key not in d:
            print("  %-*s missing from the C++ dump" % (width, key))
            failures += 1
            continue
        r = ref[key]
        v = torch.from_numpy(d[key]).double()
        if v.numel() != r.numel():
            print("  %-*s has %d values, PyTorch %d" % (width, key, v.numel(), r.numel()))
            failures += 1
            continue
        if key.endswith("num_batches_tracked"):
            ok = bool(torch.equal(v, r))
            print("  %-*s %s (volfuse %g, torch %g)" % (width, key, "ok" if ok else "FAIL", v[0], r[0]))
            failures += not ok
            continue
        norm = r.norm().item()
        e_vf = (v - r).norm().item()
        e_32 = (t32[key] - r).norm().item()
        bound = 4 * e_32 + 1e-6 * norm
        ok = e_vf <= bound
        rel = lambda e: e / norm if norm > 0 else e
        print("  %-*s volfuse %.2e  torch-float32 %.2e  bound %.2e  %s" % (width, key, rel(e_vf), rel(e_32), rel(bound),
                                                                           "ok" if ok else "FAIL"))
        failures += not ok
    return failures


def main():
    exe, scratch, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(scratch, exist_ok=True)
    subprocess.run([exe, "--dump", scratch] + extra, check=True)
    failures = 0
    for name, cls in (("video", VideoActionRecognizer), ("medical", MedicalImageAnalyzer)):
        path = os.path.join(scratch, name + ".bin")
        if not os.path.exists(path):
            continue
        d = read_dump(path)
        shape = tuple(int(v) for v in d["input_shape"])
        ref = run(cls, d, torch.float64, shape)
        t32 = run(cls, d, torch.float32, shape)
        failures += compare(cls.__name__, d, ref, t32)
        os.remove(path)
    print("%d failed" % failures)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
