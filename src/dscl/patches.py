"""ROI pooling of patch boxes on a backbone feature map (PBSD teacher, METHOD.md A.7).

One :func:`torchvision.ops.roi_align` call pools all ``L x B`` boxes; the spatial scale is derived from
the actual feature-map and image sizes (the official code hard-codes 1/32, which is only right for a
ResNet at 224 px).

Choice of ``aligned`` (default ``True``, a deliberate difference from the official ``aligned=False``,
METHOD.md C.2 item 7): with ``aligned=True`` a box edge at pixel ``x`` maps to the continuous map
coordinate ``x * scale`` where cell ``j`` spans ``[j, j + 1)``, i.e. pixel-exact. With ``aligned=False``
every sampling point is shifted by half a feature cell towards the bottom-right (16 px at 224 px with
stride 32; 3.5 px of a 28 px image on the 4x4 ``convnet`` map), so a whole-image box pools a
shifted, border-clamped region instead of the whole map. With ``aligned=True`` and 2x2 bins the
whole-image box gives the global average pool exactly on an even-sized map (8x8) and for any map that
is linear in position, which is what the PBSD teacher is meant to be (METHOD.md G 14).
Pass ``aligned=False`` to reproduce the official pooling.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

ALIGNED_DEFAULT = True


def _hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    if len(image_size) != 2:
        raise ValueError(f"image_size must be an int or (h, w), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def pool_boxes(
    feature_map: Tensor,
    boxes: Tensor,
    image_size: int | tuple[int, int],
    *,
    output_size: int = 2,
    aligned: bool = ALIGNED_DEFAULT,
) -> Tensor:
    """Average-pool each box of each image from its feature map.

    Each box is ROI-aligned to ``output_size x output_size`` bilinear bins (METHOD.md A.7: 2x2, adaptive
    sampling ratio) and the bins are averaged, approximating the average of the map over the box.

    Args:
        feature_map: ``(B, C, H, W)`` last conv-stage map of the images the boxes were drawn on.
        boxes: ``(B, L, 4)`` float boxes ``(x1, y1, x2, y2)`` in pixels of those images.
        image_size: ``h`` (square) or ``(h, w)`` in pixels of the images that produced the map.
        output_size: bins per side before averaging.
        aligned: roi_align's pixel convention; see the module docstring for why ``True`` is default.

    Returns:
        ``(L, B, C)`` float32 pooled features, L-major like the patch tensors of the student.

    Raises:
        ValueError: bad shapes, or map and image sizes that imply different horizontal and vertical
            scales (beyond one cell of rounding).
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (B, C, H, W), got shape {tuple(feature_map.shape)}")
    b, c, h, w = feature_map.shape
    if boxes.dim() != 3 or boxes.shape[0] != b or boxes.shape[2] != 4:
        raise ValueError(
            f"boxes must be (B={b}, L, 4) for feature_map {tuple(feature_map.shape)}, "
            f"got {tuple(boxes.shape)}"
        )
    img_h, img_w = _hw(image_size)
    if img_h <= 0 or img_w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    scale = w / img_w
    # Maps from strided convs / ceil-mode pools round each side separately: allow < 1 cell of slack.
    if abs(h - img_h * scale) >= 1.0:
        raise ValueError(
            f"feature_map {h}x{w} does not match image {img_h}x{img_w}: the width gives scale {scale:.4g} "
            f"(expected height {img_h * scale:.2f} cells, got {h})"
        )
    n_boxes = boxes.shape[1]
    with torch.autocast(device_type=feature_map.device.type, enabled=False):
        fmap = feature_map.float()
        # (B, L, 4) -> (L*B, 4), row l*B + b is box l of image b.
        flat = boxes.detach().to(device=fmap.device, dtype=torch.float32).transpose(0, 1).reshape(-1, 4)
        index = torch.arange(b, device=fmap.device, dtype=torch.float32).repeat(n_boxes)
        rois = torch.cat([index[:, None], flat], dim=1)  # (L*B, 5): batch index, x1, y1, x2, y2
        pooled = roi_align(
            fmap, rois, output_size=output_size, spatial_scale=scale, sampling_ratio=-1, aligned=aligned
        )  # (L*B, C, o, o)
        return pooled.mean(dim=(2, 3)).view(n_boxes, b, c)
