"""PyTorch twins of two benchmark networks, an outside anchor for the whole-network tables.

ResNet-18 and MobileNetV2 as torchvision defines them (``torchvision.models.resnet18`` and
``mobilenet_v2``: the same layers, widths, strides, paddings and initialisation), written in
plain ``torch.nn`` because torchvision's compiled operators need the torch release they were
built for. MobileNetV2's classifier dropout is left out, as in the Flax network
(``networks.MobileNet``). Both take the sizes of a ``networks.ModelSpec`` so that the
``--quick`` versions have twins too; at full size their parameter counts equal torchvision's
(11,689,512 and 3,504,872) and the Flax networks' (``tests/test_models_bench.py``).

PyTorch runs in its default ``(N, C, H, W)`` layout, as users call it.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def _init(module: nn.Module) -> None:
  """torchvision's initialisation of ResNet and MobileNetV2."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


def _conv_bn(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1):
  """A bias-free convolution padded by ``(kernel - 1) // 2``, then BatchNorm."""
  return [
    nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
    nn.BatchNorm2d(outputs),
  ]


class BasicBlock(nn.Module):
  """torchvision's ``BasicBlock``: two 3x3 convs, a 1x1 projection where the shape changes."""

  def __init__(self, inputs: int, outputs: int, stride: int):
    super().__init__()
    self.body = nn.Sequential(
      *_conv_bn(inputs, outputs, 3, stride), nn.ReLU(inplace=True), *_conv_bn(outputs, outputs, 3)
    )
    self.shortcut = (
      nn.Sequential(*_conv_bn(inputs, outputs, 1, stride))
      if stride != 1 or inputs != outputs
      else nn.Identity()
    )
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
  """torchvision's ``ResNet`` with basic blocks; ``ResNet([2, 2, 2, 2])`` is ResNet-18."""

  def __init__(self, stage_sizes: Sequence[int], num_filters: int = 64, num_classes: int = 1000):
    super().__init__()
    layers = [*_conv_bn(3, num_filters, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    inputs = num_filters
    for i, blocks in enumerate(stage_sizes):
      outputs = num_filters * 2**i
      for j in range(blocks):
        layers.append(BasicBlock(inputs, outputs, 2 if i > 0 and j == 0 else 1))
        inputs = outputs
    self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    self.fc = nn.Linear(inputs, num_classes)
    _init(self)

  def forward(self, x):
    return self.fc(self.features(x))


class InvertedResidual(nn.Module):
  """torchvision's MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project (ReLU6)."""

  def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
    super().__init__()
    hidden = inputs * expansion
    layers = [] if expansion == 1 else [*_conv_bn(inputs, hidden, 1), nn.ReLU6(inplace=True)]
    layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
    self.body = nn.Sequential(*layers, *_conv_bn(hidden, outputs, 1))
    self.residual = stride == 1 and inputs == outputs

  def forward(self, x):
    return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
  """torchvision's ``MobileNetV2`` (width 1.0, no classifier dropout).

  ``blocks`` rows are ``(expansion, features, repeats, stride, kernel)`` as in
  ``networks.MOBILENETV2_BLOCKS`` (the kernel is always 3).
  """

  def __init__(
    self,
    blocks: Sequence[tuple[int, int, int, int, int]],
    stem_features: int = 32,
    head_features: int = 1280,
    num_classes: int = 1000,
  ):
    super().__init__()
    layers = [*_conv_bn(3, stem_features, 3, 2), nn.ReLU6(inplace=True)]
    inputs = stem_features
    for expansion, features, repeats, stride, kernel in blocks:
      if kernel != 3:
        raise ValueError(f"MobileNetV2: `blocks` kernel must be 3, got {kernel}")
      for j in range(repeats):
        layers.append(InvertedResidual(inputs, features, stride if j == 0 else 1, expansion))
        inputs = features
    layers += [*_conv_bn(inputs, head_features, 1), nn.ReLU6(inplace=True)]
    self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    self.classifier = nn.Linear(head_features, num_classes)
    _init(self)
    nn.init.normal_(self.classifier.weight, 0, 0.01)
    nn.init.zeros_(self.classifier.bias)

  def forward(self, x):
    return self.classifier(self.features(x))


def twin_of(name: str, flax_model) -> nn.Module | None:
  """The PyTorch twin of benchmark network ``name`` with ``flax_model``'s sizes, or None."""
  m = flax_model
  if name == "resnet18":
    return ResNet(m.stage_sizes, m.num_filters, m.num_classes)
  if name == "mobilenetv2":
    return MobileNetV2(m.blocks, m.stem_features, m.head_features, m.num_classes)
  return None
