"""Image tokens: raw pixel patches (default), or a frozen ViT-B/16 from a local weights file.

``pixels``: non-overlapping 16 x 16 patches of a 224 x 224 tile (196 tokens),
normalised pixel values flattened per patch; the model's projection of them is
trained. Nothing crosses patches, so a patch's token depends on its own pixels
only (the reference found ViT tokens leak global information).
``vit_b16``: timm's ViT-B/16, frozen, 197 tokens of 768-d (the reference
setting); weights only from a local file, never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from geojepa.errors import GeoJepaError


def patch_positions(grid: int, cls_token: bool = False) -> np.ndarray:
    """(grid*grid [+1], 8): each patch's cell corners in tile coordinates (row 0 of the image is north)."""
    r, c = np.divmod(np.arange(grid * grid), grid)
    x0, x1 = c / grid, (c + 1) / grid
    y1, y0 = 1 - r / grid, 1 - (r + 1) / grid
    pos = np.column_stack([x0, y0, x1, y0, x1, y1, x0, y1]).astype(np.float32)
    if cls_token:
        pos = np.vstack([np.array([0, 0, 1, 0, 1, 1, 0, 1], np.float32), pos])
    return pos


def pixel_patches(pixels: np.ndarray, patch: int = 16) -> np.ndarray:
    """(H, W, C) uint8 -> (H/patch * W/patch, patch*patch*C) float32, values scaled to about [-2, 2]."""
    h, w, c = pixels.shape
    if h % patch or w % patch:
        raise GeoJepaError(f"image of {h} x {w} px is not a multiple of the {patch} px patch")
    x = (pixels.astype(np.float32) / 255.0 - 0.5) / 0.25
    x = x.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(-1, patch * patch * c)


def token_width(image_tokenizer: str, patch_px: int, bands: int) -> int:
    """The width of an image's tokens: ViT-B/16's, or a pixel patch's (``pixel_patches``); 0 without bands
    (no image)."""
    if not bands:
        return 0
    return ViTB16.dim if image_tokenizer == "vit_b16" else patch_px * patch_px * bands


class ViTB16:
    """timm ViT-B/16 (ImageNet weights from ``weights``), frozen; RGB only."""

    dim = 768

    def __init__(self, weights: str | None, allow_random: bool = False, device: str = "cpu"):
        import timm
        import torch

        if weights is None and not allow_random:
            raise GeoJepaError("tokens.image_tokenizer=vit_b16 needs tokens.vit_weights (a local .pth/.safetensors "
                               "file); set tokens.vit_allow_random=true to run with random weights on purpose")
        self.model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval().to(device)
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise GeoJepaError(f"{path}: ViT weights not found")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            missing, _ = self.model.load_state_dict(state, strict=False)
            if missing:
                raise GeoJepaError(f"{path}: not ViT-B/16 weights (missing {missing[:3]}...)")
        self.device = device

    def tokens(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, 197, 768) for (224, 224, >=3) uint8 images."""
        import torch

        mean = np.array([0.485, 0.456, 0.406], np.float32)
        std = np.array([0.229, 0.224, 0.225], np.float32)
        x = np.stack([(im[..., :3].astype(np.float32) / 255 - mean) / std for im in images]).transpose(0, 3, 1, 2)
        with torch.no_grad():
            return self.model.forward_features(torch.from_numpy(x).to(self.device)).cpu().numpy()
