"""Tables that keep every value whole, whatever the width: btx's terminal and log-file tables.

`FitTable` is a rich renderable that chooses its layout when it is drawn, from the width it gets
(an 80-column terminal, a log file, which rich gives 80 columns, or a live display):

1. a table with every cell on one line: numbers, row names and paths are never wrapped, folded or
   cut; only headers wrap, at spaces;
2. the same with text columns (notes, results) wrapped at spaces, never inside a word;
3. without the columns marked `optional` (values that can be derived from others);
4. with row names wrapped at spaces onto at most two lines;
5. stacked: one block per row, its name on a line and then `header value` pairs, each pair kept
   whole on one line.

Cells are rich markup strings (escape what is not markup) or rich Text. Only rich is imported here: every
module that prints a table sits above this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

# A box-drawn table spends 3 cells per column (a border and two padding cells) and one more border.
_BORDER_PER_COLUMN = 3
_STACK_INDENT = 2
_STACK_GAP = 3


@dataclass(frozen=True)
class Column:
    header: str
    kind: str = "number"  # label (the row's name; the first column) | number | text
    optional: bool = False  # may be left out when the table does not fit
    justify: str | None = None  # default: right for numbers, left otherwise
    style: str | None = None

    def __post_init__(self):
        if self.kind not in ("label", "number", "text"):
            raise ValueError(f"column {self.header!r}: kind must be label, number or text, got {self.kind!r}")


def _text(cell: str | Text) -> Text:
    return cell.copy() if isinstance(cell, Text) else Text.from_markup(cell)


def _lines(cell: str | Text) -> list[Text]:
    return _text(cell).split("\n")


def _width(cell: str | Text) -> int:
    return max((line.cell_len for line in _lines(cell)), default=0)


def _longest_word(cell: str | Text) -> int:
    return max((len(word) for line in _lines(cell) for word in line.plain.split()), default=0)


def _two_line_width(cell: str | Text) -> int:
    """The narrowest width at which `cell` wraps at spaces onto at most two lines."""
    words = _text(cell).plain.split()
    if len(words) <= 1:
        return _width(cell)
    return min(max(len(" ".join(words[:i])), len(" ".join(words[i:]))) for i in range(1, len(words)))


class FitTable:
    def __init__(
        self,
        columns: Sequence[Column],
        rows: Sequence[Sequence[str | Text]],
        title: str | None = None,
        caption: str | None = None,
        compact: bool = False,
    ):
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"a row has {len(row)} cells for {len(columns)} columns")
        self.columns, self.rows, self.title, self.caption = list(columns), [list(r) for r in rows], title, caption
        self.compact = compact  # no outer border and no padding at the edges (heatmaps)

    # -- choosing the layout ------------------------------------------------------------------

    def _column_widths(self, keep: list[int], label_lines: int, wrap_text: bool, width: int) -> list[int] | None:
        """Widths of the kept columns that fit `width`, or None."""
        low, high = [], []
        for i in keep:
            col = self.columns[i]
            cells = [row[i] for row in self.rows]
            header_word = _longest_word(col.header)
            natural = max([_width(c) for c in cells] + [header_word])
            if col.kind == "label" and label_lines == 2:
                least = max([_two_line_width(c) for c in cells] + [header_word])
            elif col.kind == "text" and wrap_text:
                least = max([_longest_word(c) for c in cells] + [header_word])
            else:
                least = natural
            low.append(least)
            high.append(max(natural, _width(col.header)))  # with room to spare, headers on one line
        room = width - (sum(low) + self._overhead(len(keep)))
        if room < 0:
            return None
        widths = list(low)
        for j in range(len(widths)):  # hand out the spare room left to right
            grow = min(room, high[j] - widths[j])
            widths[j] += grow
            room -= grow
        return widths

    def _overhead(self, n: int) -> int:
        """Cells a table of n columns spends on borders and padding."""
        return _BORDER_PER_COLUMN * n - 3 if self.compact else _BORDER_PER_COLUMN * n + 1

    def layout(self, width: int) -> tuple[list[int], list[int]] | None:
        """(kept column indices, their widths) for a table within `width`; None: stacked."""
        everything = list(range(len(self.columns)))
        essential = [i for i in everything if not self.columns[i].optional]
        attempts = ((everything, 1, False), (everything, 1, True), (essential, 1, True), (essential, 2, True))
        for keep, label_lines, wrap_text in attempts:
            widths = self._column_widths(keep, label_lines, wrap_text, width)
            if widths is not None:
                return keep, widths
        return None

    # -- drawing --------------------------------------------------------------------------------

    def table(self, keep: list[int], widths: list[int]) -> Table:
        table = Table(
            title=self.title,
            caption=self.caption,
            title_justify="left",
            caption_justify="left",
            show_edge=not self.compact,
            pad_edge=not self.compact,
        )
        for i, w in zip(keep, widths):
            col = self.columns[i]
            justify = col.justify or ("right" if col.kind == "number" else "left")
            # A width no cell exceeds (labels: two lines at most), so nothing is folded or cut.
            table.add_column(col.header, justify=justify, width=w, style=col.style, overflow="fold")
        for row in self.rows:
            table.add_row(*(row[i] for i in keep))
        return table

    def stacked(self, width: int) -> list[Text]:
        label = next((i for i, c in enumerate(self.columns) if c.kind == "label"), None)
        out: list[Text] = []
        if self.title:
            out.append(Text.from_markup(f"[italic]{self.title}[/]"))
        for row in self.rows:
            if label is not None:
                name = _text(row[label])
                name.stylize("bold")
                out.append(name)
            line, used = Text(" " * _STACK_INDENT), _STACK_INDENT
            for i, col in enumerate(self.columns):
                if i == label:
                    continue
                value = Text(" ").join(_lines(row[i]))
                if not value.plain.strip():
                    continue
                header = Text(" ").join(_lines(col.header))
                header.stylize("dim")
                pair = Text.assemble(header, " ", value)
                if _STACK_INDENT + pair.cell_len > width:  # too long for any line: the header, then
                    if used > _STACK_INDENT:  # each line of the value on its own
                        out.append(line)
                    out.append(Text.assemble(" " * _STACK_INDENT, header))
                    out += [Text.assemble(" " * 2 * _STACK_INDENT, part) for part in _lines(row[i])]
                    line, used = Text(" " * _STACK_INDENT), _STACK_INDENT
                    continue
                gap = _STACK_GAP if used > _STACK_INDENT else 0
                if used + gap + pair.cell_len > width and used > _STACK_INDENT:
                    out.append(line)
                    line, used, gap = Text(" " * _STACK_INDENT), _STACK_INDENT, 0
                line.append(" " * gap)
                line.append_text(pair)
                used += gap + pair.cell_len
            if used > _STACK_INDENT:
                out.append(line)
        if self.caption:
            out.append(Text.from_markup(f"[dim]{self.caption}[/]"))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        chosen = self.layout(options.max_width)
        if chosen is not None:
            yield self.table(*chosen)
            return
        for line in self.stacked(options.max_width):
            line.overflow = "fold"  # only a single value wider than the whole line is folded
            yield line

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)
