"""The seed's two networks in PyTorch (shared/seed/BatchNorm3d.md), as the golden scripts build
them: the same layers, in the same order, with the same state_dict names as volfuse's
gen/examples/ networks."""
import torch


class VideoActionRecognizer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(3, 64, 7, stride=2, padding=3)
        self.bn1 = torch.nn.BatchNorm3d(64)
        self.maxpool = torch.nn.MaxPool3d(2)
        self.conv2 = torch.nn.Conv3d(64, 128, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm3d(128)
        self.avgpool = torch.nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = torch.nn.Linear(128, 400)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(x)
        return self.fc(x.view(x.shape[0], -1))


class MedicalImageAnalyzer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv3d(1, 32, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm3d(32)
        self.conv2 = torch.nn.Conv3d(32, 64, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm3d(64)
        self.fc = torch.nn.Linear(64 * 64 * 64 * 64, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.view(x.shape[0], -1))
