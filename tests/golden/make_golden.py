#!/usr/bin/env python3
"""Writes golden fixtures for volfuse's BatchNorm3d from PyTorch (Debian's python3-torch 1.13).

Usage:
  make_golden.py --out tests/golden/batchnorm3d.txt            # the committed fixture set
  make_golden.py --random 40 --seed 7 --out F [--check EXE]     # randomized configs; with --check,
                                                                # run EXE with VOLFUSE_FIXTURES=F
Format (text, one record per line, float32 values as 8 hex digits of their bits, tensors in
logical NCDHW order whatever the layout the case runs in):
  case <name> <C> <eps> <momentum|None> <affine 0/1> <track 0/1> <ncdhw|ndhwc> <relu 0/1>
  weight/bias <n> <values>          initial parameters (affine only)
  step <train|eval> <N> <C> <D> <H> <W>
  x/dy/y/dx/running_mean/running_var/grad_weight/grad_bias <n> <values>
  nbt <value>
"""
import argparse
import os
import random
import struct
import subprocess
import sys

import torch

torch.set_num_threads(1)


def hexs(t):
    vals = t.detach().contiguous().reshape(-1).tolist()
    return " ".join("%08x" % struct.unpack("<I", struct.pack("<f", v))[0] for v in vals)


def emit(out, key, t):
    out.write("%s %d %s\n" % (key, t.numel(), hexs(t)))


def run_case(out, name, C, shapes_modes, eps=1e-5, momentum=0.1, affine=True, track=True, layout="ncdhw",
             relu=False, scale=1.0, shift=0.0, gen=None, special=None):
    bn = torch.nn.BatchNorm3d(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.5, 0.5, generator=gen)
    out.write("case %s %d %r %s %d %d %s %d\n" % (name, C, eps, "None" if momentum is None else repr(momentum),
                                                 affine, track, layout, relu))
    if affine:
        emit(out, "weight", bn.weight)
        emit(out, "bias", bn.bias)
    for mode, shape in shapes_modes:
        bn.train(mode == "train")
        x = torch.randn(*shape, generator=gen) * scale + shift
        if special is not None:
            special(x)
        dy = torch.randn(*shape, generator=gen)
        xin = x.clone()
        if layout == "ndhwc":
            xin = xin.contiguous(memory_format=torch.channels_last_3d)
        xin.requires_grad_(True)
        y = bn(xin)
        if relu:
            y = torch.relu(y)
        y.backward(dy)
        out.write("step %s %s\n" % (mode, " ".join(str(s) for s in shape)))
        emit(out, "x", x)
        emit(out, "dy", dy)
        emit(out, "y", y)
        emit(out, "dx", xin.grad)
        if track:
            emit(out, "running_mean", bn.running_mean)
            emit(out, "running_var", bn.running_var)
            out.write("nbt %d\n" % bn.num_batches_tracked.item())
        if affine:
            emit(out, "grad_weight", bn.weight.grad)
            emit(out, "grad_bias", bn.bias.grad)


def fixed_cases(out):
    g = torch.Generator().manual_seed(20261123)
    seq = lambda shape, modes: [(m, shape) for m in modes]
    T3E2 = ["train", "train", "train", "eval", "eval"]
    for layout in ("ncdhw", "ndhwc"):
        for relu in (False, True):
            tag = "%s_%s" % (layout, "relu" if relu else "plain")
            run_case(out, "basic_" + tag, 3, seq((2, 3, 2, 3, 5), T3E2), layout=layout, relu=relu, gen=g)
            run_case(out, "c17_odd_" + tag, 17, seq((2, 17, 1, 3, 7), ["train", "train", "eval"]), layout=layout, relu=relu, gen=g)
            run_case(out, "c256_" + tag, 256, seq((1, 256, 1, 1, 3), ["train", "eval"]), layout=layout,
                     relu=relu, gen=g)
        run_case(out, "c1_n1_" + layout, 1, seq((1, 1, 3, 3, 3), ["train", "train", "eval"]), layout=layout, gen=g)
        run_case(out, "nc111_" + layout, 5, seq((4, 5, 1, 1, 1), ["train", "train", "eval"]), layout=layout,
                 relu=True, gen=g)
        run_case(out, "cma_" + layout, 4, seq((2, 4, 3, 3, 3), ["train", "train", "train", "eval"]), momentum=None,
                 layout=layout, relu=True, gen=g)
        run_case(out, "no_affine_" + layout, 3, seq((2, 3, 2, 3, 5), T3E2), affine=False, layout=layout, gen=g)
        run_case(out, "no_track_" + layout, 3, seq((2, 3, 3, 4, 5), ["train", "eval", "train"]), track=False,
                 layout=layout, relu=True, gen=g)
        run_case(out, "bare_" + layout, 3, seq((2, 3, 3, 4, 5), ["train", "eval"]), affine=False, track=False,
                 layout=layout, gen=g)
        run_case(out, "momentum0_" + layout, 3, seq((2, 3, 2, 3, 4), ["train", "train", "eval"]), momentum=0.0,
                 layout=layout, gen=g)
        run_case(out, "momentum1_" + layout, 3, seq((2, 3, 2, 3, 4), ["train", "train", "eval"]), momentum=1.0,
                 layout=layout, gen=g)
        run_case(out, "low_momentum_eps_" + layout, 6, seq((2, 6, 3, 3, 3), ["train", "train", "eval"]),
                 momentum=0.01, eps=1e-3, layout=layout, relu=True, gen=g)
        run_case(out, "large_mean_" + layout, 2, seq((4, 2, 2, 4, 9), ["train", "train", "eval"]), scale=1.0,
                 shift=1e4, layout=layout, gen=g)

        def constant_channel(x):
            x[:, 1] = 100.0

        run_case(out, "constant_channel_eps0_" + layout, 3, seq((2, 3, 2, 3, 5), ["train", "eval"]), eps=0.0,
                 layout=layout, relu=True, gen=g, special=constant_channel)
        run_case(out, "empty_batch_" + layout, 3, seq((0, 3, 2, 2, 2), ["train", "eval"]), layout=layout, gen=g)


def random_cases(out, count, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    for i in range(count):
        C = rng.choice([1, 2, 3, 5, 8, 16, 17, 31, 64])
        shape = (rng.randint(1, 3), C, rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 9))
        if shape[0] * shape[2] * shape[3] * shape[4] == 1:
            shape = (2,) + shape[1:]
        affine, track = rng.random() < 0.7, rng.random() < 0.7
        momentum = rng.choice([0.1, 0.3, None, 0.01])
        modes = [rng.choice(["train", "train", "eval"]) for _ in range(rng.randint(1, 4))]
        run_case(out, "random%d" % i, C, [(m, shape) for m in modes], eps=rng.choice([1e-5, 1e-3]),
                 momentum=momentum, affine=affine, track=track, layout=rng.choice(["ncdhw", "ndhwc"]),
                 relu=rng.random() < 0.5, scale=rng.choice([1.0, 3.0]), shift=rng.choice([0.0, 2.0, -5.0]), gen=g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--random", type=int, default=0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--check", default=None)
    ap.add_argument("rest", nargs="*", help="arguments for the --check program (after --)")
    a = ap.parse_args()
    with open(a.out, "w") as out:
        out.write("# generated by tests/golden/make_golden.py with torch %s\n" % torch.__version__)
        if a.random:
            seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
            print("torch live check: %d random configurations, seed %d" % (a.random, seed))
            random_cases(out, a.random, seed)
        else:
            fixed_cases(out)
    if a.check:
        env = dict(os.environ, VOLFUSE_FIXTURES=os.path.abspath(a.out))
        sys.exit(subprocess.call([a.check] + a.rest, env=env))


if __name__ == "__main__":
    main()
