"""The two result files of a bench run (results.json, results.md), and re-rendering them.

    .venv/bin/python -m bench.report bench/results.json   # re-derive medians/targets/results.md

The numbers are in ``bench/report_figures.py``, the markdown in ``bench/report_markdown.py``;
this module only writes both files, so ``bench.run`` and a re-render produce them the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.report_figures import medians, others, rss_summary, targets
from bench.report_markdown import render_markdown


def write(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "results.md").write_text(render_markdown(result))


def rerender(path: Path) -> None:
    """Recompute medians, RSS and targets from the raw runs of a results.json, rewrite both."""
    result = json.loads(path.read_text())
    result["medians"] = medians(result["runs"])
    result["rss"] = rss_summary(result["runs"])
    result["targets"] = targets(result["medians"], result["refusal"], result["rss"])
    result["other_figures"] = others(result["medians"])
    write(result, path.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("results", nargs="?", type=Path, default=Path("bench/results.json"))
    rerender(parser.parse_args().results)


if __name__ == "__main__":
    main()
