"""The seed's VideoActionRecognizer and MedicalImageAnalyzer (tests/golden/seed_models.py, at
reduced input sizes) trained 20 SGD steps (momentum, weight decay, CrossEntropyLoss) after
volfuse.convert(model) and as plain PyTorch, from the same weights and data.

Stated tolerance, per step's loss: volfuse's float32 loss differs from PyTorch's float64 loss by
at most 4x PyTorch float32's own difference plus 1e-5 of the loss (the criterion of the C++
seed-training test, tests/golden/seed_training.py: both compute in float32 with different
summation orders; a wrong term would cost orders of magnitude more).  After the 20 steps the same
holds for every parameter and buffer (2-norms), num_batches_tracked is equal, and state_dicts
round-trip between the converted and the plain model."""
import copy
import os
import sys
import unittest

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden"))
from seed_models import MedicalImageAnalyzer, VideoActionRecognizer  # noqa: E402

import volfuse  # noqa: E402

STEPS = 20


def video():
    return VideoActionRecognizer(), (4, 3, 8, 32, 32), 400


def medical():
    m = MedicalImageAnalyzer()
    m.fc = torch.nn.Linear(64 * 12 * 12 * 12, 2)  # the seed's head for 12^3 volumes instead of 64^3
    return m, (2, 1, 12, 12, 12), 2


def train(model, x, target, dtype):
    model = model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x.to(dtype)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().double() for k, v in model.state_dict().items()}


class SeedNetworks(unittest.TestCase):
    def check(self, make):
        torch.manual_seed(0)
        model, shape, classes = make()
        x = torch.randn(shape)
        target = torch.randint(0, classes, (shape[0],))
        converted = volfuse.convert(copy.deepcopy(model))
        bns = [m for m in converted.modules() if isinstance(m, torch.nn.BatchNorm3d)]
        self.assertTrue(bns and all(type(m) is volfuse.BatchNorm3d for m in bns))
        ref_losses, ref_state = train(copy.deepcopy(model), x, target, torch.float64)
        t32_losses, t32_state = train(copy.deepcopy(model), x, target, torch.float32)
        vol_losses, vol_state = train(converted, x, target, torch.float32)
        for step, (r, t, v) in enumerate(zip(ref_losses, t32_losses, vol_losses)):
            with self.subTest(step=step):
                self.assertLessEqual(abs(v - r), 4 * abs(t - r) + 1e-5 * abs(r),
                                     "step %d: volfuse %.9g, torch float32 %.9g, float64 %.9g" % (step, v, t, r))
        for k, r in ref_state.items():
            with self.subTest(tensor=k):
                if k.endswith("num_batches_tracked"):
                    self.assertEqual(int(vol_state[k]), int(t32_state[k]))
                    continue
                ev, et = (vol_state[k] - r).norm().item(), (t32_state[k] - r).norm().item()
                self.assertLessEqual(ev, 4 * et + 1e-5 * r.norm().item(), k)
        # state_dicts round-trip both ways, and the models then compute the same
        plain = copy.deepcopy(model)
        plain.load_state_dict(converted.state_dict())
        again = volfuse.convert(copy.deepcopy(model))
        again.load_state_dict(plain.state_dict())
        self.assertEqual(list(converted.state_dict()), list(model.state_dict()))
        plain.eval(), again.eval()
        with torch.no_grad():
            torch.testing.assert_close(again(x), plain(x), rtol=1e-4, atol=1e-5)

    def test_video_action_recognizer(self):
        self.check(video)

    def test_medical_image_analyzer(self):
        self.check(medical)

    def test_convert_shares_and_keeps(self):
        seq = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4, momentum=None),
                                  torch.nn.ReLU(), torch.nn.Sequential(torch.nn.BatchNorm3d(4, affine=False)))
        seq[3][0].eval()
        w = seq[1].weight
        out = volfuse.convert(seq)
        self.assertIs(out, seq)
        self.assertIs(type(seq[1]), volfuse.BatchNorm3d)
        self.assertIs(type(seq[3][0]), volfuse.BatchNorm3d)
        self.assertIs(seq[1].weight, w)  # the same Parameter: optimizers keep working
        self.assertIsNone(seq[1].momentum)
        self.assertFalse(seq[3][0].training)
        single = volfuse.convert(torch.nn.BatchNorm3d(3))
        self.assertIs(type(single), volfuse.BatchNorm3d)


if __name__ == "__main__":
    unittest.main(verbosity=2)
