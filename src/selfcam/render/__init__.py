"""Drawing: computed images, maps and numbers in; uint8 images, data URIs and HTML pages out.

Nothing here loads a model, a dataset or a run directory (that is :mod:`selfcam.report`'s work).

- :mod:`~selfcam.render.images`: :func:`overlay`, :func:`tile`, :func:`draw_box`, :func:`mask_outline`,
  :func:`panel`, :func:`attribute_sheet`, :func:`frame_strip`, :func:`clip_frames`, :func:`importance_rows` (uint8 ``(H, W, 3)``) and the encoders
  :func:`png_data_uri`, :func:`gif_bytes`, :func:`gif_data_uri`, :func:`clip_gif`;
- :mod:`~selfcam.render.figures`: matplotlib figures as PNG data URIs: :func:`training_curves`,
  :func:`line_panels`, :func:`matrices`, :func:`importance_bars`;
- :mod:`~selfcam.render.html`: :func:`write_report` (one self-contained HTML file) and its :class:`Gallery`.
"""

from .figures import importance_bars, line_panels, matrices, training_curves
from .html import Gallery, write_report
from .images import (attribute_sheet, clip_frames, clip_gif, draw_box, frame_strip, gif_bytes, gif_data_uri,
                     importance_rows, mask_outline, overlay, panel, png_data_uri, tile)  # fmt: skip

__all__ = [
    "Gallery",
    "attribute_sheet",
    "clip_frames",
    "clip_gif",
    "draw_box",
    "frame_strip",
    "gif_bytes",
    "gif_data_uri",
    "importance_bars",
    "importance_rows",
    "line_panels",
    "mask_outline",
    "matrices",
    "overlay",
    "panel",
    "png_data_uri",
    "tile",
    "training_curves",
    "write_report",
]
