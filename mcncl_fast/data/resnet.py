"""A ResNet (He et al. 2016, torchvision's v1.5 layout) for per-frame visual features.

torchvision cannot be imported beside every torch build, so the extractor
carries its own ResNet with torchvision's exact module names: a torchvision
checkpoint (e.g. `resnet101-63fe2227.pth`, a plain state_dict) loads into it
with `strict=True`. The architecture (basic / bottleneck blocks, blocks per
stage, stem width, number of classes) is read from the state_dict keys, so any
resnet18/34/50/101/152 file - or a tiny one for tests - works unchanged.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Type

import torch
import torch.nn as nn


def _conv3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = _conv1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes, stride), nn.BatchNorm2d(planes)   # stride here: v1.5
        self.conv3, self.bn3 = _conv1(planes, planes * 4), nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    def __init__(self, block: Type[nn.Module], layers: List[int], num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.block_name = block.__name__
        self.layers_spec = list(layers)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        for i, n in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or cin != planes * block.expansion):
                    down = nn.Sequential(_conv1(cin, planes * block.expansion, stride),
                                         nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(cin, planes, stride if j == 0 else 1, down))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.feature_dim = cin

    def pooled(self, x):
        """[N, 3, H, W] normalised images -> [N, C] global-average-pooled features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(len(self.layers_spec)):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.pooled(x))


def clean_state_dict(obj) -> Dict[str, torch.Tensor]:
    """Accept a bare state_dict or {'state_dict'|'model': ...}; strip DataParallel's 'module.' prefix."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state_dict (a dict of tensors)")
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in obj.items())


def resnet_from_state_dict(state_dict) -> ResNet:
    """Build the ResNet a torchvision-format state_dict describes and load it (strict)."""
    sd = clean_state_dict(state_dict)
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError("not a ResNet state_dict: conv1.weight / fc.weight missing (torchvision key names expected)")
    counts = []
    for i in range(1, 5):
        idx = {int(m.group(1)) for k in sd for m in [re.match(rf"layer{i}\.(\d+)\.", k)] if m}
        if not idx:
            break
        counts.append(max(idx) + 1)
    if not counts:
        raise ValueError("not a ResNet state_dict: no layer1.* keys")
    block = Bottleneck if "layer1.0.conv3.weight" in sd else BasicBlock
    model = ResNet(block, counts, num_classes=sd["fc.weight"].shape[0], width=sd["conv1.weight"].shape[0])
    model.load_state_dict(sd, strict=True)
    return model
