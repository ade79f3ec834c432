"""Every notebook exercise: the starting code fails its check, the reference solution passes.

For each exercise registered in ``labkit.lab.exercises`` (id "NN.k"), the notebook
``notebooks/NN_*.ipynb`` holds a code cell tagged ``{"labkit": {"exercise": "NN.k"}}``:
the broken starting code. Executed alone, in a fresh namespace, it must FAIL the check
against the real server; ``solutions/NN_k.py`` executed alone must PASS it. New
exercises are covered as soon as they are registered.
"""

from __future__ import annotations

import ast
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any

import nbformat
import pytest
from sqlalchemy.engine import URL

from labkit.lab import exercises
from labkit.lab.exercises import (
    CheckResult,
    Exercise,
    ExerciseFailed,
    check,
    registry,
    require,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOLUTIONS = ROOT / "solutions"
REGISTERED = registry()


def notebook_of(exercise_id: str) -> Path:
    """The notebook ``NN_*.ipynb`` of exercise "NN.k" (exactly one)."""
    found = sorted(NOTEBOOKS.glob(f"{exercise_id.split('.')[0]}_*.ipynb"))
    assert len(found) == 1, f"exercise {exercise_id}: expected one notebook, found {found}"
    return found[0]


def tagged_cells(path: Path) -> dict[str, str]:
    """The exercise cells of a notebook: id -> source."""
    nb = nbformat.read(path, as_version=4)
    cells: dict[str, str] = {}
    for cell in nb.cells:
        tag = cell.get("metadata", {}).get("labkit", {}).get("exercise")
        if tag is not None:
            assert cell.cell_type == "code", f"{path.name}: exercise {tag} is not a code cell"
            assert tag not in cells, f"{path.name}: exercise {tag} is tagged twice"
            cells[tag] = cell.source
    return cells


def run_alone(source: str, filename: str) -> dict[str, Any]:
    """Execute ``source`` in a fresh module, as a learner's new kernel would.

    A module of its own in ``sys.modules`` (like a kernel's ``__main__``): SQLAlchemy
    resolves a model's ``Mapped[...]`` annotations through it.
    """
    module = types.ModuleType(f"labkit_exercise_{uuid.uuid4().hex[:12]}")
    sys.modules[module.__name__] = module
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our own files
    return module.__dict__


def run_check(exercise_id: str, namespace: dict[str, Any], url: URL) -> tuple[CheckResult, float]:
    start = time.monotonic()
    result = check(exercise_id, namespace, url)
    return result, time.monotonic() - start


@pytest.mark.parametrize("exercise_id", list(REGISTERED))
def test_starting_code_fails_its_check(exercise_id: str, db_url: URL) -> None:
    path = notebook_of(exercise_id)
    cells = tagged_cells(path)
    assert exercise_id in cells, f"{path.name} has no cell tagged as exercise {exercise_id}"
    namespace = run_alone(cells[exercise_id], f"{path.name}[{exercise_id}]")
    result, elapsed = run_check(exercise_id, namespace, db_url)
    assert not result.passed, f"the starting code of {exercise_id} passes: {result.message}"
    assert "Hint: " in result.message
    assert elapsed < REGISTERED[exercise_id].timeout


@pytest.mark.parametrize("exercise_id", list(REGISTERED))
def test_reference_solution_passes_its_check(exercise_id: str, db_url: URL) -> None:
    solution = SOLUTIONS / REGISTERED[exercise_id].solution_name
    assert solution.is_file(), f"no reference solution {solution.relative_to(ROOT)}"
    source = solution.read_text()
    namespace = run_alone(source, str(solution))
    result, elapsed = run_check(exercise_id, namespace, db_url)
    assert result.passed, f"the solution of {exercise_id} fails: {result.message}"
    assert elapsed < REGISTERED[exercise_id].timeout


@pytest.mark.parametrize("exercise_id", list(REGISTERED))
def test_check_on_an_empty_namespace_names_what_is_missing(exercise_id: str, db_url: URL,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    result = check(exercise_id, {}, db_url)
    assert not result.passed
    assert "is not defined" in result.message
    assert capsys.readouterr().out.startswith(f"NOT YET {exercise_id} - ")


@pytest.mark.parametrize("exercise_id", list(REGISTERED))
def test_solution_file_says_what_was_wrong(exercise_id: str) -> None:
    solution = SOLUTIONS / REGISTERED[exercise_id].solution_name
    docstring = ast.get_docstring(ast.parse(solution.read_text()))
    assert docstring and docstring.strip(), \
        f"{solution.name} has no docstring saying what was wrong"


def test_every_tagged_cell_has_a_check_and_a_solution() -> None:
    tagged = {tag: path.name for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
              for tag in tagged_cells(path)}
    for tag, name in tagged.items():
        assert tag in REGISTERED, f"{name}: exercise {tag} has no registered check"
        assert tag.split(".")[0] == name[:2], f"{name}: exercise {tag} is in another notebook"
    solutions = {path.stem.replace("_", ".") for path in SOLUTIONS.glob("[0-9][0-9]_*.py")}
    assert solutions == set(REGISTERED), "solutions/ and the registered exercises differ"


def test_every_notebook_check_cell_names_a_registered_exercise() -> None:
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and "check(\"" in cell.source:
                called = cell.source.split("check(\"", 1)[1].split("\"", 1)[0]
                assert called in REGISTERED, f"{path.name} checks unknown exercise {called}"


# The framework itself, on exercises made up for the test.

@pytest.fixture
def made_up(monkeypatch: pytest.MonkeyPatch):
    """Register a made-up exercise "99.k" for one test, gone afterwards."""
    def add(k: int, function: Any, timeout: float = 5.0) -> str:
        exercise_id = f"99.{k}"
        monkeypatch.setitem(exercises._REGISTRY, exercise_id,
                            Exercise(id=exercise_id, title="made up", hint="look closer",
                                     function=function, timeout=timeout))
        return exercise_id
    return add


def test_missing_name_is_not_yet_and_does_not_raise(made_up, db_url: URL,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    exercise_id = made_up(1, lambda namespace, url: require(namespace, "get_db", callable))
    result = check(exercise_id, {}, db_url)
    out = capsys.readouterr().out
    assert not result.passed
    assert "`get_db` is not defined" in result.message
    assert out.startswith("NOT YET 99.1 - `get_db` is not defined")
    assert "Hint: look closer" in out


def test_wrong_kind_and_learner_exception_are_not_yet(made_up, db_url: URL) -> None:
    wrong_kind = made_up(2, lambda namespace, url: require(namespace, "get_db", callable))
    result = check(wrong_kind, {"get_db": 3}, db_url)
    assert "`get_db` should be callable, not int" in result.message

    def raises(namespace: Any, url: URL) -> str:
        namespace["work"]()
        return "never"

    def boom() -> None:
        raise ZeroDivisionError("oops")

    learner_error = made_up(3, raises)
    result = check(learner_error, {"work": boom}, db_url)
    assert not result.passed
    assert "your code raised ZeroDivisionError: oops" in result.message


def test_a_check_that_hangs_is_cut_off(made_up, db_url: URL) -> None:
    exercise_id = made_up(4, lambda namespace, url: time.sleep(3) or "late", timeout=0.3)
    start = time.monotonic()
    result = check(exercise_id, {}, db_url)
    assert time.monotonic() - start < 2.0
    assert not result.passed
    assert "did not finish within 0.3 s" in result.message


def test_pass_prints_the_detail(made_up, db_url: URL, capsys: pytest.CaptureFixture[str]) -> None:
    exercise_id = made_up(5, lambda namespace, url: "all good")
    assert check(exercise_id, {}, db_url).passed
    assert capsys.readouterr().out == "PASS 99.5 - all good\n"


def test_failed_message_masks_the_password(made_up, db_url: URL) -> None:
    def leaks(namespace: Any, url: URL) -> str:
        raise ExerciseFailed(f"could not reach {url.render_as_string(hide_password=False)}")

    exercise_id = made_up(6, leaks)
    result = check(exercise_id, {}, db_url)
    if db_url.password:
        assert str(db_url.password) not in result.message


def test_ids_are_validated() -> None:
    with pytest.raises(ValueError, match="must look like"):
        exercises.exercise("1.1", title="t", hint="h")
    with pytest.raises(KeyError, match="no exercise"):
        check("98.9", {})


def test_exercises_page_lists_every_exercise_with_its_solution() -> None:
    # docs/_hooks/exercises.py builds the site's Exercises page from the registry and
    # solutions/: each exercise under its notebook, its solution folded.
    sys.path.insert(0, str(ROOT / "docs" / "_hooks"))
    try:
        from exercises import exercises_markdown  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "docs" / "_hooks"))
    markdown, problems = exercises_markdown(ROOT)
    assert problems == []
    for exercise_id, exercise in REGISTERED.items():
        assert f"### {exercise_id} · {exercise.title}" in markdown
        assert f'??? success "Solution {exercise_id}: `solutions/{exercise.solution_name}`"' \
            in markdown
    assert "{exercises}" in (ROOT / "docs" / "exercises.md").read_text()
