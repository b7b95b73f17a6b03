#!/usr/bin/env python3
"""volfuse as PyTorch users call it, against plain PyTorch in the same process:

  1. BatchNorm3d alone: the module's forward + backward (torch.autograd.grad of the output
     w.r.t. input, weight and bias), volfuse.BatchNorm3d vs torch.nn.BatchNorm3d, training
     mode, float32, contiguous and channels_last_3d;
  2. one training step (forward, CrossEntropyLoss, backward, SGD with momentum) of the seed's
     networks at reduced sizes, plain vs volfuse.convert(model, fuse=False) (BatchNorm3d
     only: the convs stay PyTorch's) and vs volfuse.convert(model) (Conv3d -> BatchNorm3d ->
     ReLU blocks fused: volfuse's convolutions too).

Each at 1 and 2 threads (torch.set_num_threads: PyTorch and volfuse share the process's OpenMP
threads).  Times are medians of repeated runs after warm-up; speedup = PyTorch / volfuse.

  bench_torch.py [--smoke]      (PYTHONPATH must reach the volfuse package: bench/run torch)
"""
import copy
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
from seed_models import MedicalImageAnalyzer, VideoActionRecognizer  # noqa: E402

import volfuse  # noqa: E402

smoke = "--smoke" in sys.argv[1:]


def median_ms(fn, reps):
    for _ in range(1 if smoke else 3):
        fn()
    times = []
    for _ in range(1 if smoke else reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bn_step(module, x, g):
    def run():
        y = module(x)
        torch.autograd.grad(y, (x, module.weight, module.bias), g)
    return run


def bench_batchnorm(threads):
    rows = []
    for shape in ([4, 64, 32, 32, 32], [2, 64, 64, 64, 64]) if not smoke else ([2, 16, 8, 8, 8],):
        for fmt, name in ((torch.contiguous_format, "NCDHW"), (torch.channels_last_3d, "NDHWC")):
            torch.manual_seed(0)
            x = torch.randn(shape).to(memory_format=fmt).requires_grad_()
            g = torch.randn(shape).to(memory_format=fmt)
            ref = torch.nn.BatchNorm3d(shape[1])
            vol = volfuse.BatchNorm3d(shape[1])
            t_ref = median_ms(bn_step(ref, x, g), 10)
            t_vol = median_ms(bn_step(vol, x, g), 10)
            rows.append(("BatchNorm3d fwd+bwd %s %s" % (name, shape), threads, t_ref, t_vol))
    return rows


def train_step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad()
        loss_fn(model(x), target).backward()
        opt.step()
    return run


def bench_seed(threads):
    rows = []
    medical = MedicalImageAnalyzer()
    medical.fc = torch.nn.Linear(64 * 24 * 24 * 24, 2)
    nets = [("VideoActionRecognizer", VideoActionRecognizer(), (4, 3, 16, 64, 64), 400),
            ("MedicalImageAnalyzer", medical, (2, 1, 24, 24, 24), 2)]
    if smoke:
        nets = [("VideoActionRecognizer", VideoActionRecognizer(), (2, 3, 4, 16, 16), 400)]
    for name, model, shape, classes in nets:
        torch.manual_seed(0)
        x, target = torch.randn(shape), torch.randint(0, classes, (shape[0],))
        plain = copy.deepcopy(model)
        t_ref = median_ms(train_step(plain, x, target), 5)
        for fuse, how in ((False, "BatchNorm3d only"), (True, "conv blocks fused")):
            converted = volfuse.convert(copy.deepcopy(model), fuse=fuse)
            t_vol = median_ms(train_step(converted, x, target), 5)
            rows.append(("%s train step %s, %s" % (name, list(shape), how), threads, t_ref, t_vol))
    return rows


def main():
    print("volfuse in PyTorch %s on %s (%d CPUs)%s" % (torch.__version__, cpu_name(), os.cpu_count(),
                                                      " -- smoke run: one iteration, nothing measured" if smoke else ""))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows += bench_batchnorm(threads)
        rows += bench_seed(threads)
    w = max(len(r[0]) for r in rows)
    print("%-*s  %7s  %12s  %12s  %8s" % (w, "what", "threads", "PyTorch ms", "volfuse ms", "speedup"))
    for what, threads, t_ref, t_vol in rows:
        print("%-*s  %7d  %12.2f  %12.2f  %7.2fx" % (w, what, threads, t_ref, t_vol, t_ref / t_vol))


if __name__ == "__main__":
    main()
