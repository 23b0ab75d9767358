"""Reports over several evaluation results: the paper-shaped comparison table (Markdown and a
self-contained HTML page) and plots (HS vs FA, HS vs over-refusal, per-category HS)."""

from .table import comparison_rows, markdown_table
from .write import check_report_out, write_report

__all__ = ["check_report_out", "comparison_rows", "markdown_table", "write_report"]
