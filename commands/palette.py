"""Class colours and the legend drawn under a picture: one home, so a class is the same colour in every picture
the commands draw (preview.py's sources, predict.py's class maps and overlays)."""

from __future__ import annotations

import colorsys

from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10: ten colours told apart on photos and by most colour-blind readers; more classes get
# evenly spaced hues.
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
LINE = 22  # pixels per text line in legends and labels


def colours(n: int) -> list[tuple[int, int, int]]:
    """The colour of each of n classes, by class index (the classes' sorted order, as runs save them)."""
    if n <= len(TAB10):
        return TAB10[:n]
    return [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.85, 0.95)) for i in range(n)]


def scale_for(height: int, width: int, max_side: int) -> float:
    """How much a picture of height x width is scaled for drawing: larger ones shrink to max_side; smaller ones
    grow by the largest whole factor that fits, so their pixels stay sharp squares."""
    factor = max_side / max(height, width)
    return factor if factor < 1 else float(int(factor))


def font(size: int = 16) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has only its fixed bitmap font
        return ImageFont.load_default()


def with_legend(image: Image.Image, title: str, entries: list[tuple[tuple, str]]) -> Image.Image:
    """The picture with a title line and a colour swatch per class below it, wrapped to the picture's width."""
    text_font = font()
    width = max(image.width, 320)
    placed, x, y = [], 8, LINE + 4
    for colour, text in entries:
        item = LINE + 6 + int(text_font.getlength(text)) + 16
        if x > 8 and x + item > width:
            x, y = 8, y + LINE
        placed.append((x, y, colour, text))
        x += item
    canvas = Image.new("RGB", (width, image.height + y + LINE + 4), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    top = image.height
    draw.text((8, top + 4), title, fill="black", font=text_font)
    for x, y, colour, text in placed:
        draw.rectangle([x, top + y + 3, x + LINE - 6, top + y + LINE - 3], fill=colour, outline="black")
        draw.text((x + LINE, top + y + 2), text, fill="black", font=text_font)
    return canvas
