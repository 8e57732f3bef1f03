"""Real classifier architectures for the converter tests, built here (random weights, fixed seed).

``resnet50`` and ``densenet121`` follow torchvision's layouts module for module, so that their
``state_dict`` keys and shapes are torchvision's own (a hospital's torchvision weights file loads
into them strictly); torchvision itself is not installed beside torch 2.13 here. The MONAI networks
come from ``monai.networks.nets``. ``trained_looking`` gives BatchNorm layers running statistics and
affine parameters far from their initial values, so that eval and training mode differ, and
activations do not vanish through 121 layers as they do with an initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torchvision's spelling
from torch import nn

# ------------------------------------------------------------------------------------------------
# torchvision ResNet-50 (torchvision/models/resnet.py: Bottleneck, ResNet; stride on conv2, "v1.5")


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), with a projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual block."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet: conv1/bn1/relu/maxpool, layer1-4, avgpool, fc."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------------------------------------
# torchvision DenseNet-121 (torchvision/models/densenet.py: _DenseLayer, _DenseBlock, _Transition)


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision's DenseNet: ``features`` (conv0/norm0/relu0/pool0, denseblocks, transitions,
    norm5), then a functional ReLU and average pool, then ``classifier``."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", _DenseBlock(num_layers, n, bn_size, growth_rate))
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", _Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes)."""
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


# ------------------------------------------------------------------------------------------------
# Factories (``module:factory`` for ``convert torch``)


def trained_looking(net: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics and affine parameters drawn away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.empty(c).uniform_(-0.2, 0.2, generator=gen))
                m.running_var.copy_(torch.empty(c).uniform_(0.5, 2.0, generator=gen))
                if m.affine:
                    m.weight.copy_(torch.empty(c).uniform_(0.6, 1.2, generator=gen))
                    m.bias.copy_(torch.empty(c).uniform_(-0.1, 0.1, generator=gen))
    return net


def resnet50(num_classes: int = 2, in_channels: int = 3) -> ResNet:
    """torchvision-layout ResNet-50 (23.5 M parameters without the 1000-class fc)."""
    torch.manual_seed(50)
    return trained_looking(ResNet((3, 4, 6, 3), num_classes, in_channels), 50)  # type: ignore[return-value]


def densenet121(num_classes: int = 2, in_channels: int = 3) -> DenseNet:
    """torchvision-layout DenseNet-121 (7.0 M parameters without the 1000-class classifier)."""
    torch.manual_seed(121)
    return trained_looking(DenseNet(num_classes=num_classes, in_channels=in_channels), 121)  # type: ignore[return-value]


def monai_densenet121(num_classes: int = 2, in_channels: int = 1, spatial_dims: int = 2) -> nn.Module:
    """MONAI's DenseNet121 (``class_layers``: relu, pool, flatten, out)."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(7)
    net = DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes)
    return trained_looking(net, 7)


def monai_efficientnet_b0(num_classes: int = 2, in_channels: int = 1, spatial_dims: int = 2) -> nn.Module:
    """MONAI's EfficientNetBN b0: SiLU (swish), squeeze-and-excitation, drop-connect (drop-path)."""
    from monai.networks.nets import EfficientNetBN

    torch.manual_seed(8)
    net = EfficientNetBN(
        "efficientnet-b0",
        pretrained=False,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
    )
    return trained_looking(net, 8)


def monai_efficientnet_b0_3d() -> nn.Module:
    """MONAI's EfficientNetBN b0 with spatial_dims=3 (a volume classifier)."""
    return monai_efficientnet_b0(spatial_dims=3)


def monai_unet(spatial_dims: int = 2, out_channels: int = 2) -> nn.Module:
    """MONAI's UNet (residual units, instance norm, PReLU; a per-pixel / per-voxel output at the
    input's size), 2-D or 3-D; small channels."""
    from monai.networks.nets import UNet

    torch.manual_seed(9)
    net = UNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=out_channels,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=1,
        norm="batch",
    )
    return trained_looking(net, 9)


def monai_segresnet(spatial_dims: int = 2, out_channels: int = 2) -> nn.Module:
    """MONAI's SegResNet (group norm, ReLU, residual blocks, transposed-free upsampling), 2-D or
    3-D; init_filters 8."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(10)
    net = SegResNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=out_channels,
        init_filters=8,
        blocks_down=(1, 2, 2),
        blocks_up=(1, 1),
    )
    return trained_looking(net, 10)


def monai_unet_3d() -> nn.Module:
    """MONAI's UNet with spatial_dims=3."""
    return monai_unet(spatial_dims=3)


def monai_segresnet_3d() -> nn.Module:
    """MONAI's SegResNet with spatial_dims=3."""
    return monai_segresnet(spatial_dims=3)


def monai_densenet121_3d() -> nn.Module:
    """MONAI's DenseNet121 with spatial_dims=3 (a volume classifier)."""
    return monai_densenet121(spatial_dims=3)


def monai_unet_sigmoid() -> nn.Module:
    """MONAI's 2-D UNet with one output channel (a sigmoid segmentation model)."""
    return monai_unet(out_channels=1)
