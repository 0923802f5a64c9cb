"""Fitting a class name into a mistakes-grid caption (training/board.py): bisection against the old cut of one
character at a time, side by side, for labels of growing length.

python -m benchmarks.captions   ->  a table of seconds per caption and the ratio
"""

from __future__ import annotations

import time

from PIL import ImageFont

from training.board import TILE, fit_text


def one_at_a_time(text: str, font, width: int) -> str:
    """The cut as it was: measure the whole label, drop its last character, measure again."""
    while font.getlength(text) > width and len(text) > 1:
        text = text[:-1]
    return text


def _seconds(cut, text: str, font) -> float:
    started = time.perf_counter()
    cut(text, font, TILE)
    return time.perf_counter() - started


def main(lengths=(30, 300, 3_000)) -> list[dict]:
    font = ImageFont.load_default()
    rows = []
    for n in lengths:
        label = ("class-name-" * (n // 11 + 1))[:n]
        assert fit_text(label, font, TILE) == one_at_a_time(label, font, TILE)
        old, new = _seconds(one_at_a_time, label, font), _seconds(fit_text, label, font)
        rows.append({"label_chars": n, "one_at_a_time_s": old, "bisection_s": new, "ratio": old / new})
    return rows


if __name__ == "__main__":
    print(f"{'label chars':>12}{'one at a time s':>17}{'bisection s':>13}{'ratio':>10}")
    for row in main():
        print(f"{row['label_chars']:>12}{row['one_at_a_time_s']:>17.4f}{row['bisection_s']:>13.6f}{row['ratio']:>10.0f}")
