"""Uploads for the image tests: arrays as the base64 PNGs clients send."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def png_b64(array: np.ndarray, data_url: bool = False) -> str:
    """``array`` (``uint8`` ``[H, W]`` or ``[H, W, 3]``) as a base64 PNG, or as a ``data:`` URL."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    text = base64.b64encode(out.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text
