"""Pages made of blocks, rendered as one self-contained HTML file or as markdown: the run report
of dc_tf.report and the pipelines' report share them.

A page is a list of blocks, each a tuple: ("h1" | "h2" | "p", text), ("table", header, rows)
with rows of strings, ("md", caption and pipe table as eval.linear_probe.markdown_table writes
it), or ("img", Image). `html_page` and `markdown_page` render the same blocks; plots are drawn
with matplotlib's Agg backend (files only, no display).
"""

import base64
import dataclasses
import html
import io

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image as PILImage  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Image:
    """A PNG of a page: `name` is its file name where it is written beside a markdown page."""
    name: str
    alt: str
    png: bytes


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 1 or 3] as PNG bytes."""
    buffer = io.BytesIO()
    PILImage.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def plot(name: str, title: str, xlabel: str, ylabel: str, series: list,
         log_y: bool = False) -> Image:
    """One line per (label, x, y) of `series`, as an Image called `name`."""
    return panels(name, title, [(title, xlabel, ylabel, series, log_y)])


def panels(name: str, alt: str, specs: list, columns: int = 3) -> Image:
    """A grid of plots in one Image (one figure renders much faster than several): each spec is
    (title, xlabel, ylabel, series, log_y), series as in `plot`."""
    rows = -(-len(specs) // columns)
    width = min(len(specs), columns)
    fig, axes = plt.subplots(rows, width, figsize=(4.6 * width, 3.2 * rows), squeeze=False)
    for ax, (title, xlabel, ylabel, series, log_y) in zip(axes.flat, specs):
        for label, x, y in series:
            ax.plot(x, y, marker="o" if len(x) < 30 else None, label=label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, ranks
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(specs):]:
        ax.set_visible(False)
    # Fixed margins: matplotlib's tight layout doubles the time of a figure.
    fig.subplots_adjust(left=0.9 / (4.6 * width), right=1 - 0.15 / (4.6 * width),
                        bottom=0.55 / (3.2 * rows), top=1 - 0.35 / (3.2 * rows),
                        wspace=0.3, hspace=0.45)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return Image(name, alt, buffer.getvalue())


def markdown_page(blocks: list) -> str:
    """The blocks as markdown; images are linked by their name."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + args[0])
        elif kind in ("p", "md"):
            out.append(args[0])
        elif kind == "table":
            header, rows = args
            out.append("\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
                                 + ["| " + " | ".join(row) + " |" for row in rows]))
        elif kind == "img":
            out.append(f"![{args[0].alt}]({args[0].name})")
    return "\n\n".join(out) + "\n"


def _html_table(header: list, rows: list) -> str:
    def cells(row, tag):
        return "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)
    return ("<table><tr>" + cells(header, "th") + "</tr>"
            + "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows) + "</table>")


def html_page(title: str, blocks: list) -> str:
    """The blocks as one self-contained HTML page: images embedded as data: URIs."""
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(args[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(args[0])}</p>")
        elif kind == "md":  # a caption paragraph, then a pipe table
            lines = args[0].splitlines()
            text = " ".join(line for line in lines if line and not line.startswith("|"))
            rows = [[c.strip() for c in line.strip("|").split("|")]
                    for line in lines if line.startswith("|") and not line.startswith("|---")]
            out.append(f"<p>{html.escape(text)}</p>" + _html_table(rows[0], rows[1:]))
        elif kind == "table":
            out.append(_html_table(*args))
        elif kind == "img":
            data = base64.b64encode(args[0].png).decode("ascii")
            # Inline: consecutive plots sit side by side where the page is wide enough.
            out.append(f'<img src="data:image/png;base64,{data}" '
                       f'alt="{html.escape(args[0].alt)}">')
    style = ("body{font-family:sans-serif;max-width:66em;margin:auto}table{border-collapse:"
             "collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
             "img{max-width:100%;vertical-align:top;margin:0.3em 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(out)
            + "\n</body></html>\n")
