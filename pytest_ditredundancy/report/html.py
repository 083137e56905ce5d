"""One self-contained HTML page from the report document (Jinja2 templates shipped in the package).

No network: styles and script are inlined, the charts are drawn in the browser by the inline script from
the summarised data embedded as JSON. Per-prompt profiles (shard runs) stay out of the page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from ..io import atomic_write_text
from . import tuning
from .document import SUITE_ORDER, SUITE_TITLES, claim_not_met, kind_label

#: models whose sections start open; more than this and every section starts closed (drawn when opened)
OPEN_MODELS = 4


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("pytest_ditredundancy", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["kind"] = kind_label
    env.filters["claim_not_met"] = claim_not_met
    env.filters["pct"] = lambda v: "–" if v is None else f"{v:.0%}"
    env.filters["pct1"] = lambda v: "–" if v is None else f"{v:.1%}"
    env.filters["floors"] = tuning.floor_texts
    return env


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


#: What the cache-gate figures draw: the frontier, the premise sweep and the schedule mask.
CACHE_FIELDS = ("strategy", "passed", "psnr", "ssim", "latent_mse", "speedup", "skipped", "sweep", "spearman", "schedule")


def embedded_json(data: Any) -> Markup:
    """JSON safe inside <script>: no '<', '>' or '&' that could close the element or start markup."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def page_data(doc: dict[str, Any]) -> dict[str, Any]:
    """What the script draws: per model its profile summaries and the records the overlays annotate."""
    models = []
    for entry in doc["models"]:
        records = [r for suite in entry["suites"].values() for r in suite["records"]]
        models.append({"model": entry["model"], "profiles": entry["profiles"],
                       "records": [{k: r.get(k) for k in ("suite", "statistic", "value", "bounds", "passed", "variant",
                                                          "kind")} for r in records],
                       "cache": [{k: r.get(k) for k in CACHE_FIELDS} for r in records if r["suite"] == "cache_gate"],
                       "tune": [tuning.search_view(r) for r in records if r["suite"] == tuning.SUITE]})
    return {"models": models, "open": len(models) <= OPEN_MODELS}


def suite_columns(doc: dict[str, Any]) -> list[tuple[str, str]]:
    names = {name for entry in doc["models"] for name in entry["suites"]}
    ordered = [n for n in SUITE_ORDER if n in names] + sorted(names - set(SUITE_ORDER))
    return [(n, SUITE_TITLES.get(n, n.replace("_", " ").capitalize())) for n in ordered]


def render_html(doc: dict[str, Any]) -> str:
    template = _environment().get_template("report.html.j2")
    return template.render(doc=doc, columns=suite_columns(doc), data_json=embedded_json(page_data(doc)),
                           open_models=len(doc["models"]) <= OPEN_MODELS)


def write_html(doc: dict[str, Any], path: Path) -> Path:
    return atomic_write_text(Path(path), render_html(doc))
