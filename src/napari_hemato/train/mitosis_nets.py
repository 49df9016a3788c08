"""Networks of the mitosis detector (torch; ``train`` extra).

Both output ``1 + n_classes`` logits per pixel at the input resolution:
channel 0 is the mitosis heatmap logit, channels 1.. the normal/atypical
logits. :class:`MitosisOutputs` turns them into the exported ``heatmap``
(sigmoid) and ``class_probs`` (softmax).

- :class:`MitosisEffNet` (default): the ImageNet-initialised EfficientNet-Lite0
  trunk (offline weights, see :func:`napari_hemato.train.wbc.pretrained_weights_path`)
  down to 1/16 (block 10, 112 channels), one decoder step to 1/8 with the
  block-4 skip (40 channels), a 1×1 head and bilinear ×8. A mitotic figure is
  told from an ordinary dark nucleus by chromatin texture, which ImageNet
  features capture far better than a small network trained from scratch on
  ~2,600 crops (model card: the comparison).
- :class:`MitosisNet`: a small encoder-decoder trained from scratch (fast; the
  smoke tests use it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from napari_hemato.train.nets import (
    TFLITE_NORMALIZATION,
    ConvBNReLU,
    FrozenTrunk,
    efficientnet_trunk,
    run_blocks,
)

#: ImageNet statistics (MitosisNet) and TF-Lite EfficientNet preprocessing (MitosisEffNet)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TFLITE_NORM = (tuple(TFLITE_NORMALIZATION["mean"]), tuple(TFLITE_NORMALIZATION["std"]))
ARCHES = ("effnet", "small")


class MitosisNet(nn.Module):
    """Encoder down to 1/2**len(widths), decoder up to 1/4, 1×1 head, bilinear ×4.

    Examples
    --------
    >>> MitosisNet(widths=(8, 8, 16))(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 3, 32, 32])
    """

    arch = "small"
    norm = IMAGENET_NORM

    def __init__(self, widths=(16, 32, 64, 96), n_classes: int = 2) -> None:
        super().__init__()
        w = tuple(int(c) for c in widths)
        if len(w) < 3:
            raise ValueError("MitosisNet needs at least 3 levels")
        self.widths = w
        self.enc = nn.ModuleList([nn.Sequential(ConvBNReLU(3, w[0], 2), ConvBNReLU(w[0], w[0]))])
        for i in range(1, len(w)):
            self.enc.append(nn.Sequential(ConvBNReLU(w[i - 1], w[i], 2), ConvBNReLU(w[i], w[i])))
        self.bottleneck = ConvBNReLU(w[-1], w[-1])
        self.dec = nn.ModuleList(
            [ConvBNReLU(w[i + 1] + w[i], w[i]) for i in range(len(w) - 2, 0, -1)])
        self.refine = ConvBNReLU(w[1], w[1])
        self.out = nn.Conv2d(w[1], 1 + n_classes, 1)
        with torch.no_grad():
            self.out.bias[0] = -4.0  # start from a low mitosis prior

    @property
    def size_divisor(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for enc in self.enc:
            h = enc(h)
            skips.append(h)
        h = self.bottleneck(h)
        for dec, skip in zip(self.dec, reversed(skips[1:-1]), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = dec(torch.cat([h, skip], dim=1))
        h = self.out(self.refine(h))
        return F.interpolate(h, scale_factor=4.0, mode="bilinear", align_corners=False)


class MitosisEffNet(FrozenTrunk, nn.Module):
    """EfficientNet-Lite0 trunk to 1/16 + one decoder step to 1/8 + bilinear ×8.

    Inputs must be multiples of 32 px: then every "same" padding of the trunk
    equals the one computed for ``image_size`` (TF-style static padding), so the
    exported model is exact at any multiple-of-32 tile size.

    Parameters
    ----------
    n_classes : int
        Class logits after the heatmap logit.
    pretrained : bool
        Load the offline ImageNet weights.
    freeze_blocks : int
        Keep the stem and this many first MBConv blocks (weights and batch-norm
        statistics) fixed.
    """

    arch = "effnet"
    norm = TFLITE_NORM
    size_divisor = 32
    #: last trunk block used (stride 16, 112 channels) and the skip (stride 8, 40 channels)
    LAST_BLOCK, SKIP_BLOCK = 10, 4

    def __init__(self, n_classes: int = 2, *, pretrained: bool = True, freeze_blocks: int = 3,
                 image_size: int = 256, drop_connect: float = 0.1) -> None:
        super().__init__()
        self.stem, self.act, self.blocks, self.n_all_blocks = efficientnet_trunk(
            self.LAST_BLOCK, pretrained=pretrained, image_size=image_size, drop_connect=drop_connect)
        self.drop_connect = drop_connect
        self.freeze_blocks = int(freeze_blocks)
        c_last = self.blocks[self.LAST_BLOCK]._project_conv.out_channels
        c_skip = self.blocks[self.SKIP_BLOCK]._project_conv.out_channels
        self.dec1 = ConvBNReLU(c_last + c_skip, 64)
        self.dec2 = ConvBNReLU(64, 64)
        self.out = nn.Conv2d(64, 1 + n_classes, 1)
        with torch.no_grad():
            self.out.bias[0] = -4.0
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, taps = run_blocks(self.blocks, self.act(self.stem(x)), drop_connect=self.drop_connect,
                             n_all=self.n_all_blocks, training=self.training,
                             taps=(self.SKIP_BLOCK,))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        h = self.dec2(self.dec1(torch.cat([h, taps[self.SKIP_BLOCK]], dim=1)))
        return F.interpolate(self.out(h), scale_factor=8.0, mode="bilinear", align_corners=False)


class MitosisOutputs(nn.Module):
    """Export wrapper: ``heatmap`` = sigmoid(logit 0), ``class_probs`` = softmax(logits 1..)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.net(x)
        return torch.sigmoid(z[:, :1]), torch.softmax(z[:, 1:], dim=1)


def build_mitosis_net(arch: str = "effnet", *, widths=(16, 32, 64, 96), pretrained: bool = True,
                      freeze_blocks: int = 3) -> nn.Module:
    """The detector network of ``arch`` (``"effnet"`` or ``"small"``)."""
    if arch == "effnet":
        return MitosisEffNet(pretrained=pretrained, freeze_blocks=freeze_blocks)
    if arch == "small":
        return MitosisNet(widths)
    raise ValueError(f"unknown mitosis architecture {arch!r} (known: {', '.join(ARCHES)})")
