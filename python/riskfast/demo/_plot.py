"""What the demos share for their ``report.png``."""

from __future__ import annotations


def require_matplotlib(no_plot: bool) -> None:
    """Raise a clear ``ImportError`` before any training when ``report.png`` is wanted
    (``no_plot`` false) and matplotlib is missing."""
    if no_plot:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"report.png needs matplotlib ({err}); pip install matplotlib, or pass --no-plot"
        ) from err
