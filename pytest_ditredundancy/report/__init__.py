"""The run report: compact profile summaries (``summary``), the report document that ``--dit-json`` writes
(``document``), the self-contained HTML page (``html``), and the pytest glue that gathers and writes them
(``collector``)."""

from .document import build_document, comparable, write_json
from .html import render_html, write_html
from .summary import profile_summary

__all__ = ["build_document", "comparable", "profile_summary", "render_html", "write_html", "write_json"]
