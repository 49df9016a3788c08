"""Fully-convolutional networks for CPU inference (torch; ``train`` extra).

:class:`SmallUNet` is a U-Net with a stride-2 stem: the encoder and decoder
work at 1/2 .. 1/16 of the input resolution, and a light full-resolution head
combines the upsampled decoder features with a 3×3 convolution of the input so
boundaries stay sharp. Inputs must have H, W divisible by
:attr:`SmallUNet.size_divisor`.

:func:`efficientnet_trunk`, :func:`run_blocks` and :class:`FrozenTrunk` build
networks on the ImageNet-initialised EfficientNet-Lite0 trunk (offline
weights), e.g. :class:`napari_hemato.train.mitosis_nets.MitosisEffNet`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBNReLU(nn.Sequential):
    """3×3 convolution (no bias), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SmallUNet(nn.Module):
    """U-Net with a stride-2 stem, ``len(widths)`` levels and a full-res head.

    Parameters
    ----------
    in_channels : int
        Input channels (3 for RGB).
    out_channels : int
        Output channels (logits; the export wrapper applies the activation).
    widths : tuple of int
        Channels at 1/2, 1/4, 1/8, 1/16 ... of the input resolution.
    head_channels : int
        Channels of the full-resolution head.

    Examples
    --------
    >>> net = SmallUNet(widths=(8, 16), head_channels=4)
    >>> net(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        widths: tuple[int, ...] = (16, 32, 48, 64),
        head_channels: int = 8,
    ) -> None:
        super().__init__()
        w = tuple(int(c) for c in widths)
        self.widths = w
        self.stem = ConvBNReLU(in_channels, w[0], stride=2)
        self.enc = nn.ModuleList([ConvBNReLU(w[0], w[0])])
        self.down = nn.ModuleList()
        for i in range(1, len(w)):
            self.down.append(ConvBNReLU(w[i - 1], w[i], stride=2))
            self.enc.append(ConvBNReLU(w[i], w[i]))
        self.bottleneck = ConvBNReLU(w[-1], w[-1])
        self.dec = nn.ModuleList(
            [ConvBNReLU(w[i + 1] + w[i], w[i]) for i in range(len(w) - 2, -1, -1)]
        )
        self.full = ConvBNReLU(in_channels, head_channels)
        self.head = ConvBNReLU(w[0] + head_channels, head_channels)
        self.out = nn.Conv2d(head_channels, out_channels, 1)

    @property
    def size_divisor(self) -> int:
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = self.enc[0](self.stem(x))
        skips.append(h)
        for down, enc in zip(self.down, self.enc[1:], strict=True):
            h = enc(down(h))
            skips.append(h)
        h = self.bottleneck(h)
        for dec, skip in zip(self.dec, reversed(skips[:-1]), strict=True):
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = dec(torch.cat([h, skip], dim=1))
        h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
        h = self.head(torch.cat([h, self.full(x)], dim=1))
        return self.out(h)


class SigmoidOutputs(nn.Module):
    """Export wrapper: sigmoid of each logit channel as a separate (N,1,H,W) output."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = torch.sigmoid(self.net(x))
        return tuple(y[:, i : i + 1] for i in range(y.shape[1]))


#: TF-Lite EfficientNet preprocessing ((x - 127) / 128), which the converted weights expect
TFLITE_NORMALIZATION = {"mean": [127.0 / 255.0] * 3, "std": [128.0 / 255.0] * 3}


def efficientnet_trunk(last_block: int, *, pretrained: bool = True, image_size: int = 256,
                       drop_connect: float = 0.1):
    """``(stem, act, blocks, n_all_blocks)`` of EfficientNet-Lite0 up to ``last_block``.

    ``stem`` is the stem convolution + batch norm (stride 2), ``act`` the
    network's activation (ReLU6), ``blocks`` the MBConv blocks ``0..last_block``
    (block 0: 1/2, 16 ch; 2: 1/4, 24 ch; 4: 1/8, 40 ch; 10: 1/16, 112 ch).
    Padding is TF-style "same", computed for ``image_size``: exact for any
    input that is a multiple of 32.
    """
    from napari_hemato.train.wbc import build_model

    base = build_model(size=image_size, pretrained=pretrained, drop_connect=drop_connect)
    return (nn.Sequential(base._conv_stem, base._bn0), base._swish,
            nn.ModuleList(base._blocks[: last_block + 1]), len(base._blocks))


def run_blocks(blocks, h: torch.Tensor, *, drop_connect: float, n_all: int, training: bool,
               taps=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run MBConv ``blocks`` (drop-connect scaled by depth, as EfficientNet does); keep ``taps``."""
    kept = {}
    for i, block in enumerate(blocks):
        h = block(h, drop_connect_rate=drop_connect * i / n_all if training else None)
        if i in taps:
            kept[i] = h
    return h, kept


class FrozenTrunk:
    """Mixin: ``frozen()`` modules keep weights and batch-norm statistics fixed in training.

    The class sets ``self.stem``, ``self.blocks`` and ``self.freeze_blocks``;
    call :meth:`freeze` once after building.
    """

    def frozen(self) -> list[nn.Module]:
        return [self.stem, *self.blocks[: self.freeze_blocks]]

    def freeze(self) -> None:
        for m in self.frozen():
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen():  # frozen batch norms keep their ImageNet statistics
            m.eval()
        return self
