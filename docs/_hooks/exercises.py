"""MkDocs hook: the list of exercises and their reference solutions, from the repository.

``docs/exercises.md`` holds the token ``{exercises}``; this hook replaces it with one
section per notebook that has exercises: each exercise's id and title (from the checks
registered in ``labkit.lab.exercises``) and its reference solution, ``solutions/NN_k.py``,
in a collapsed block. An exercise added to a notebook, with its check and its solution,
appears on the page without editing it. A solution without a registered check, or a check
without a solution, is a warning, so ``mkdocs build --strict`` fails.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "{exercises}"
PAGE = "exercises.md"

log = logging.getLogger("mkdocs.hooks.exercises")


def exercises_markdown(root: Path = ROOT,
                       titles: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Return the Markdown that lists every exercise, and the problems found.

    Args:
        root: The repository (holding ``notebooks/`` and ``solutions/``).
        titles: Notebook titles by file name (``"08_network.ipynb": "07 The network"``,
            as in the site's navigation); else made from the file name.

    Returns:
        The Markdown, and a message for each solution without a check or check without
        a solution (empty when the two agree).
    """
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from labkit.lab.exercises import registry

    exercises = registry()
    solutions = {path.stem.replace("_", "."): path
                 for path in sorted((root / "solutions").glob("[0-9][0-9]_*.py"))}
    problems = [f"solutions/{path.name} has no registered check"
                for id_, path in solutions.items() if id_ not in exercises]
    problems += [f"exercise {id_} has no solutions/{exercise.solution_name}"
                 for id_, exercise in exercises.items() if id_ not in solutions]
    notebooks = {path.name[:2]: path
                 for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
    lines: list[str] = []
    current = None
    for id_, exercise in exercises.items():
        notebook = notebooks.get(exercise.notebook)
        if notebook is None:
            problems.append(f"exercise {id_} names no notebook {exercise.notebook}_*.ipynb")
            continue
        if exercise.notebook != current:
            current = exercise.notebook
            title = (titles or {}).get(notebook.name, "").removeprefix(current).strip()
            if not title:
                title = notebook.stem[3:].replace("_", " ")
            lines += [f"## {current} · {title[:1].upper()}{title[1:]}", "",
                      f"In [notebook {current}](notebooks/{notebook.name}), section "
                      "*Exercises*.", ""]
        lines += [f"### {id_} · {exercise.title}", ""]
        summary = inspect.getdoc(exercise.function)
        if summary:
            lines += ["*The check:* " + " ".join(summary.split("\n\n")[0].split()), ""]
        solution = solutions.get(id_)
        if solution is None:
            lines += ["*No reference solution yet.*", ""]
            continue
        code = solution.read_text(encoding="utf-8").rstrip("\n")
        lines += [f'??? success "Solution {id_}: `solutions/{solution.name}`"', "",
                  "    ```python"]
        lines += [f"    {line}" if line else "" for line in code.splitlines()]
        lines += ["    ```", ""]
    return "\n".join(lines), problems


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill the exercises page's ``{exercises}`` token."""
    if page.file.src_uri != PAGE or TOKEN not in markdown:
        return markdown
    listing, problems = exercises_markdown(ROOT, _notebook_titles(config["nav"] or []))
    for problem in problems:
        log.warning("Exercises page: %s.", problem)
    return markdown.replace(TOKEN, listing)


def _notebook_titles(nav: list) -> dict[str, str]:
    """The navigation's titles of the notebook pages, by file name."""
    titles: dict[str, str] = {}
    for item in nav:
        for title, value in (item.items() if isinstance(item, dict) else []):
            if isinstance(value, list):
                titles.update(_notebook_titles(value))
            elif isinstance(value, str) and value.startswith("notebooks/"):
                titles[value.removeprefix("notebooks/")] = title
    return titles
