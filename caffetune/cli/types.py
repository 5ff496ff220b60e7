"""Option value types shared by every command that takes them: OLD=NEW, B,G,R (numbers), WxH, OLD:NEW,...

Each parses once, in click, so a bad value is a usage error (exit 2) naming the option, before any work starts.
"""
from __future__ import annotations

import click


class Rename(click.ParamType):
    """OLD=NEW -> (old, new): `rewrite --rename`, `graft --map`."""

    name = "OLD=NEW"

    def convert(self, value, param, ctx) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        old, sep, new = str(value).partition("=")
        if not sep or not old or not new:
            self.fail(f"{value!r} is not OLD=NEW (e.g. fc8=fc8_flickr)", param, ctx)
        return old, new


class Numbers(click.ParamType):
    """Comma- or space-separated numbers -> tuple of floats, with an allowed count: B,G,R means, W[,B] mults."""

    def __init__(self, metavar: str, counts: tuple[int, ...]):
        self.name = metavar
        self.counts = counts

    @staticmethod
    def parse(value) -> tuple[float, ...] | None:
        """The numbers of "1,2 3", or None when a part is not a number."""
        try:
            return tuple(float(part) for part in str(value).replace(",", " ").split())
        except ValueError:
            return None

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        numbers = self.parse(value)
        if numbers is None:
            self.fail(f"{value!r} is not {self.name} (numbers separated by commas, e.g. 104,117,123)", param, ctx)
        if len(numbers) not in self.counts:
            self.fail(f"{value!r}: expected {self.name} ({' or '.join(map(str, self.counts))} numbers)", param, ctx)
        return numbers


class Weights(Numbers):
    """Comma-separated non-negative numbers, any count (per-class loss weights: one per class)."""

    def __init__(self, metavar: str):
        super().__init__(metavar, ())

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        numbers = self.parse(value)
        if not numbers or any(number < 0 for number in numbers):
            self.fail(f"{value!r} is not {self.name} (non-negative numbers separated by commas)", param, ctx)
        return numbers


CLASS_WEIGHTS = Weights("W1,...,WN")
MEAN_VALUES = Numbers("B,G,R", (1, 3))     # one value per channel (grey: one), in Caffe's BGR order
LR_MULTS = Numbers("W[,B]", (1, 2))


class Size(click.ParamType):
    """WxH (or one number for a square) -> (width, height)."""

    name = "WxH"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        text = str(value).lower().replace("*", "x")
        try:
            width, height = (int(v) for v in text.split("x")) if "x" in text else (int(text), int(text))
        except ValueError:
            self.fail(f"{value!r} is not WxH (e.g. 256x256) or one number", param, ctx)
        if width <= 0 or height <= 0:
            self.fail("width and height must be positive", param, ctx)
        return width, height


class ClassPairs(click.ParamType):
    """OLD:NEW,OLD:NEW,... -> [(old class index, new class index), ...], each new index from one old class."""

    name = "OLD:NEW,..."

    def convert(self, value, param, ctx) -> list[tuple[int, int]]:
        if isinstance(value, list):
            return value
        pairs = []
        for item in filter(None, (part.strip() for part in str(value).split(","))):
            old, sep, new = item.partition(":")
            if not sep or not old.strip().isdigit() or not new.strip().isdigit():
                self.fail(f"{item!r} is not OLD_INDEX:NEW_INDEX (e.g. 281:0,285:1)", param, ctx)
            pairs.append((int(old), int(new)))
        news = [new for _, new in pairs]
        duplicated = sorted({n for n in news if news.count(n) > 1})
        if duplicated:
            self.fail(f"new class {duplicated[0]} is given more than one old class", param, ctx)
        return pairs


RENAME = Rename()
SIZE = Size()
CLASS_PAIRS = ClassPairs()
