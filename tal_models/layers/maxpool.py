"""TemporalMaxer's block: masked max-pooling, no parameters."""

from __future__ import annotations

from torch import Tensor, nn

from tal_models.layers.masking import check_inputs, check_odd, check_stride, masked_max_pool


class MaxPoolBlock(nn.Module):
    """TemporalMaxer's block: a masked max-pool, no parameters.

    ``forward(x [B, C, T], mask [B, 1, T]) -> ([B, C, T / stride], [B, 1, T / stride])``; see
    ``masked_max_pool``. ``channels`` is unused, for a constructor like the other blocks'.
    """

    def __init__(self, channels: int | None = None, stride: int = 2, kernel_size: int = 3):
        super().__init__()
        check_odd("MaxPoolBlock kernel_size", kernel_size)
        check_stride("MaxPoolBlock", stride)
        self.stride, self.kernel_size = stride, kernel_size

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_inputs(x, mask, self.stride, "MaxPoolBlock")
        return masked_max_pool(x, mask, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"
