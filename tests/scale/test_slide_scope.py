"""Every query over a slide-keyed table filters that table by slide_id, so that the tables can be
distributed by slide (Citus, spatialdb/sql/citus.sql) with every join and subquery shard-local.

The SQL is parsed with PostgreSQL's own parser (pglast): the feature functions of
migrations/sql/0002_features.sql and 0006_faster_features.sql (SQL and PL/pgSQL bodies), every
complete statement written as a string in spatialdb/ and dashboard/, and the statements the
export modules compose at run time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pglast
import pytest
from pglast import ast as pg
from pglast.enums import A_Expr_Kind
from pglast.visitors import Visitor

from spatialdb.features import export as feature_export
from spatialdb.interop import qupath_geojson
from spatialdb.store.schema import OBJECT_TABLES

ROOT = Path(__file__).resolve().parents[2]
SLIDE_KEYED = {*OBJECT_TABLES, "gland_feature", "slide_feature", "slide_embedding"} | {
    "slide_prediction"
}
PARAMETER = re.compile(r"%\(\w+\)s|%s|(?<![:\w]):\w+")


def _from_items(node) -> list:
    """The tables, functions and subqueries a FROM item joins at this query level."""
    if isinstance(node, pg.JoinExpr):
        return _from_items(node.larg) + _from_items(node.rarg)
    return [node]


def _joins(items) -> list[pg.JoinExpr]:
    found = []
    for item in items or ():
        if isinstance(item, pg.JoinExpr):
            found += [item, *_joins([item.larg, item.rarg])]
    return found


def _nested(ancestors) -> bool:
    """Whether a query sits inside another statement (subquery, CTE, LATERAL, INSERT's SELECT),
    not as a branch of a UNION."""
    path = ancestors
    while path is not None:
        if isinstance(path.node, STATEMENTS) and path.member not in ("larg", "rarg"):
            return True
        path = path.parent
    return False


class _SlideConditions(Visitor):
    """Aliases compared by `alias.slide_id = ...` (or `= ANY(...)`) anywhere below a node; None
    for a bare `slide_id`."""

    def __init__(self):
        self.aliases: set[str | None] = set()

    def visit_A_Expr(self, ancestors, node):
        if node.kind not in (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_OP_ANY):
            return
        if [n.sval for n in node.name] != ["="]:
            return
        for side in (node.lexpr, node.rexpr):
            if isinstance(side, pg.ColumnRef):
                fields = [getattr(f, "sval", None) for f in side.fields]
                if fields[-1] == "slide_id":
                    self.aliases.add(fields[0] if len(fields) == 2 else None)


class _Unscoped(Visitor):
    """Slide-keyed tables that a join or a subquery reads without a slide_id condition (a scan
    of one table on its own may span slides: Citus runs it on every shard)."""

    def __init__(self):
        self.problems: list[str] = []

    def _check(self, ancestors, target, from_clause, where) -> None:
        items = [target] if target is not None else []
        items += [i for item in from_clause or () for i in _from_items(item)]
        if len(items) < 2 and not _nested(ancestors):
            return
        conditions = _SlideConditions()
        for node in (where, *(j.quals for j in _joins(from_clause))):
            if node is not None:
                conditions(node)
        for item in items:
            if isinstance(item, pg.RangeVar) and item.relname in SLIDE_KEYED:
                name = item.alias.aliasname if item.alias else item.relname
                if not {name, None} & conditions.aliases:
                    self.problems.append(f"{item.relname} {name}")

    def visit_SelectStmt(self, ancestors, node):
        self._check(ancestors, None, node.fromClause, node.whereClause)

    def visit_DeleteStmt(self, ancestors, node):
        self._check(ancestors, node.relation, node.usingClause, node.whereClause)

    def visit_UpdateStmt(self, ancestors, node):
        self._check(ancestors, node.relation, node.fromClause, node.whereClause)


STATEMENTS = (pg.SelectStmt, pg.InsertStmt, pg.DeleteStmt, pg.UpdateStmt)


def unscoped(statement: str) -> list[str]:
    """'table alias' for each slide-keyed table in `statement` that a join or subquery reads
    without a slide_id condition."""
    visitor = _Unscoped()
    for raw in pglast.parse_sql(statement):
        visitor(raw.stmt)
    return visitor.problems


def _function_bodies(path: Path) -> dict[str, str]:
    """name -> each SQL statement of the SQL and PL/pgSQL functions a script creates."""
    bodies = {}
    for raw in pglast.parse_sql(path.read_text()):
        stmt = raw.stmt
        if not isinstance(stmt, pg.CreateFunctionStmt):
            continue
        name = stmt.funcname[-1].sval
        options = {o.defname: o.arg for o in stmt.options}
        language = options["language"].sval
        if language == "sql":
            bodies[name] = options["as"][0].sval
        else:
            source = path.read_text()[raw.stmt_location : raw.stmt_location + raw.stmt_len]
            bodies[name] = ";\n".join(_plpgsql_queries(pglast.parse_plpgsql(source)))
    return bodies


def _plpgsql_queries(tree) -> list[str]:
    if isinstance(tree, dict):
        if "PLpgSQL_expr" in tree:  # statements (parse mode 0), not conditions such as FOUND
            expr = tree["PLpgSQL_expr"]
            return [expr["query"]] if expr.get("parseMode") == 0 else []
        return [q for value in tree.values() for q in _plpgsql_queries(value)]
    if isinstance(tree, list):
        return [q for value in tree for q in _plpgsql_queries(value)]
    return []


def _string_statements(path: Path) -> list[str]:
    """Complete statements written as string constants in a module, parameters made `$1` and
    `{table}` fields an object table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        if not re.search(r"\b(SELECT|DELETE|UPDATE)\b", node.value):
            continue
        text = PARAMETER.sub("$1", node.value).replace("{table}", "nucleus")
        if "{" in text:
            continue  # a template composed at run time
        try:
            pglast.parse_sql(text)
        except pglast.parser.ParseError:
            continue  # a fragment of a composed statement
        found.append(text)
    return found


@pytest.mark.parametrize(
    ("script", "functions"),
    [
        ("0002_features.sql", {"gland_features", "slide_features", "refresh_slide_features"}),
        ("0006_faster_features.sql", {"gland_features", "slide_features"}),
        ("0008_nucleus_features.sql", {"nucleus_features"}),
    ],
)
def test_the_feature_functions_filter_every_table_by_slide(script, functions):
    bodies = _function_bodies(ROOT / "migrations" / "sql" / script)
    assert set(bodies) >= functions
    for name, body in bodies.items():
        assert unscoped(body) == [], name


def test_statements_in_the_code_filter_every_table_by_slide():
    modules = sorted([*(ROOT / "spatialdb").rglob("*.py"), *(ROOT / "dashboard").rglob("*.py")])
    checked = {}
    for module in modules:
        statements = [s for s in _string_statements(module) if _touches_slide_tables(s)]
        for statement in statements:
            assert unscoped(statement) == [], f"{module}: {statement}"
        checked[module.relative_to(ROOT).as_posix()] = len(statements)
    for module in (
        "spatialdb/features/refresh.py",
        "spatialdb/nic/embeddings.py",
        "dashboard/data.py",
    ):
        assert checked[module] >= 1, module


def test_composed_export_queries_filter_every_table_by_slide(engine):
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        composed = [
            q
            for level in ("gland", "nucleus", "slide")
            for q in feature_export._queries(cur, level, [1, 2], geometry=True)
        ]
        composed += [qupath_geojson.feature_query(t, 1, {}) for t in OBJECT_TABLES]
        composed += [qupath_geojson.object_query(t, 1) for t in OBJECT_TABLES]
        statements = [q.as_string(cur) for q in composed]
    finally:
        raw.rollback()
        raw.close()
    assert len(statements) == 3 + 2 + 2 * len(OBJECT_TABLES) - 1
    for statement in statements:
        assert unscoped(statement) == [], statement


def _touches_slide_tables(statement: str) -> bool:
    return any(re.search(rf"\b{t}\b", statement) for t in SLIDE_KEYED)


@pytest.mark.parametrize(
    ("statement", "problems"),
    [
        ("SELECT n.id FROM gland g JOIN nucleus n ON ST_Contains(g.geom, n.centroid) "
         "WHERE g.slide_id = $1", ["nucleus n"]),
        ("SELECT g.id, (SELECT count(*) FROM lumen l WHERE ST_Contains(g.geom, l.centroid)) "
         "FROM gland g WHERE g.slide_id = $1", ["lumen l"]),
        ("SELECT * FROM gland g CROSS JOIN LATERAL (SELECT n.id FROM nucleus n "
         "WHERE n.slide_id = g.slide_id ORDER BY g.geom <-> n.centroid LIMIT 1) k", ["gland g"]),
        ("DELETE FROM gland_feature f USING run r WHERE r.id = f.run_id AND r.slide_id = $1",
         ["gland_feature f"]),
        ("WITH n AS (SELECT id FROM nucleus WHERE class = 'tumour') SELECT count(*) FROM n",
         ["nucleus nucleus"]),
        ("SELECT count(*) FROM slide s JOIN slide_feature f ON f.run_id = s.current_run_id",
         ["slide_feature f"]),
    ],
)  # fmt: skip
def test_a_query_without_the_slide_is_caught(statement, problems):
    assert unscoped(statement) == problems


def test_queries_scoped_by_slide_and_single_table_scans_pass():
    assert unscoped(
        "SELECT n.id FROM gland g JOIN nucleus n ON n.slide_id = g.slide_id "
        "AND ST_Contains(g.geom, n.centroid) WHERE g.slide_id = ANY($1)"
    ) == []  # fmt: skip
    assert unscoped("SELECT class, count(*) FROM nucleus GROUP BY class") == []
