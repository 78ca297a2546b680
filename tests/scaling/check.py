"""The invariants docs/SCALING.md relies on, checked against an installed herald (issue 14 §3).

Distributing herald with Citus by workspace_id needs:
  1. the tables docs/SCALING.md lists as distributed and as reference tables to be exactly the
     extension's tables; every distributed table to have workspace_id leading its primary key (tables
     without one are append-only logs) and included in every unique index (leading, except the
     exceptions listed below with the reason; MIGRATION names keys to change before distributing);
  2. no statement of the extension's SQL (functions and views, read back from the catalog) joining two
     distributed relations without equating their workspace_id, directly (a.workspace_id =
     b.workspace_id) or through the same value (a.workspace_id = v_ws AND b.workspace_id = v_ws), also
     across correlated and LATERAL subqueries. Such a join is co-located: Citus runs it on the node that
     holds the workspace. Reference tables are on every node: joins with them are always local.

Statements are parsed with libpg_query (pglast), PL/pgSQL bodies included. Only conditions combined with
AND count; an OR never proves equality. Usage: python3 tests/scaling/check.py [dbname] (default
herald_scaling; the database must have the extension). Exits 1 listing every violation, 2 when
the checker fails its own cases.
"""

import itertools
import os
import re
import sys

import psycopg
import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.stream import RawStream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALING_MD = os.path.join(ROOT, "docs", "SCALING.md")

# Unique indexes that include workspace_id without leading with it, and why (docs/SCALING.md repeats it).
NOT_LEADING = {
    "contacts_workspace_id_email_key":
        "(email, workspace_id): a probe by address must not be planned through the primary key when the "
        "statistics do not know a new workspace yet (see sql/schema.sql); Citus needs the distribution "
        "column in a unique index, not first",
}
# Keys a single node is better off without, changed by the migration step docs/SCALING.md describes
# before the table is distributed. Each must be named there; no other key may break the rules.
MIGRATION = {
    "outbox_pkey": "claim and complete find jobs by id alone; distributed, it becomes (workspace_id, id)",
    "outbox_broadcast_idx": "two integers per recipient; distributed, it becomes (workspace_id, broadcast_id, "
                            "contact_id)",
}

# ---------------------------------------------------------------------------------------------------
# 1. keys and the documented lists

def relations(conn):
    """name → (relkind, has workspace_id) for every table and view of the herald schema."""
    rows = conn.execute("""
        SELECT c.relname, c.relkind,
               EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'workspace_id'
                                                      AND NOT a.attisdropped)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'herald' AND c.relkind IN ('r', 'p', 'v', 'm')""").fetchall()
    return {name: (kind, scoped) for name, kind, scoped in rows}


def key_problems(conn, distributed):
    """Problems with the keys of the distributed tables, and the migration steps still pending."""
    problems, pending = [], []
    rows = conn.execute("""
        SELECT t.relname, i.relname, x.indisprimary,
               ARRAY(SELECT a.attname FROM unnest(x.indkey) WITH ORDINALITY k(attnum, ord)
                       JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum ORDER BY k.ord)::text[]
          FROM pg_index x
          JOIN pg_class t ON t.oid = x.indrelid
          JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'herald' AND (x.indisunique OR x.indisprimary)""").fetchall()
    for table, index, primary, cols in sorted(rows):
        if table not in distributed:
            continue
        what = f"{table}: {'primary key' if primary else 'unique index'} {index} ({', '.join(cols)})"
        if index in MIGRATION:
            pending.append(f"{what}: {MIGRATION[index]}")
        elif primary and cols[0] != "workspace_id":
            problems.append(f"{what} does not lead with workspace_id")
        elif "workspace_id" not in cols:
            problems.append(f"{what} does not include workspace_id")
        elif cols[0] != "workspace_id" and index not in NOT_LEADING:
            problems.append(f"{what} does not lead with workspace_id (reorder it, or add it to NOT_LEADING "
                            "in tests/scaling/check.py and to docs/SCALING.md with the reason)")
    return problems, pending


def documented(section):
    """The `herald.x` names listed in docs/SCALING.md under the heading that starts with `section`."""
    text = open(SCALING_MD, encoding="utf-8").read()
    m = re.search(r"^#+ " + re.escape(section) + r".*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    if not m:
        return None
    return set(re.findall(r"`herald\.([a-z_]+)`", m.group(1)))


def doc_problems(rels):
    """The tables docs/SCALING.md lists as distributed and as reference tables against the catalog:
    every table in exactly one list, every table without workspace_id a reference table, every key
    exception explained. Returns (problems, the distributed tables)."""
    if not os.path.exists(SCALING_MD):
        return ["docs/SCALING.md is missing"], set()
    text = open(SCALING_MD, encoding="utf-8").read()
    tables = {n for n, (k, _) in rels.items() if k in ("r", "p")}
    distributed, reference = documented("Distributed tables"), documented("Reference tables")
    if distributed is None or reference is None:
        return ["docs/SCALING.md needs the sections 'Distributed tables' and 'Reference tables'"], set()
    problems = []
    for name in sorted(tables - distributed - reference):
        problems.append(f"docs/SCALING.md: herald.{name} is in neither 'Distributed tables' nor 'Reference tables'")
    for name in sorted(distributed & reference):
        problems.append(f"docs/SCALING.md: herald.{name} is listed both as distributed and as reference table")
    for name in sorted((distributed | reference) - tables):
        problems.append(f"docs/SCALING.md: herald.{name} is not a table of the extension")
    for name in sorted(distributed & tables):
        if not rels[name][1]:
            problems.append(f"docs/SCALING.md: herald.{name} has no workspace_id and cannot be distributed by it")
    for index in list(NOT_LEADING) + list(MIGRATION):
        if index not in text:
            problems.append(f"docs/SCALING.md does not explain the key {index}")
    return problems, distributed & tables


# ---------------------------------------------------------------------------------------------------
# 2. joins

class Equalities:
    """Union-find over the things a condition equates: (scope, alias) relations' workspace_id, and any
    other expression by its text (a parameter, a variable, a column of a CTE or function)."""

    def __init__(self, parent=None):
        self.up = dict(parent.up) if parent else {}

    def find(self, k):
        while self.up.get(k, k) != k:
            k = self.up[k]
        return k

    def join(self, a, b):
        self.up[self.find(a)] = self.find(b)


class Scope:
    def __init__(self, outer=None):
        self.outer = outer
        self.rels = {}        # alias → relation name (workspace-scoped ones only)
        self.others = set()   # aliases of everything else in FROM (CTEs, functions, subqueries)
        self.eq = Equalities(outer.eq if outer else None)
        self.correlated = set()   # (scope, alias) of enclosing relations this scope refers to
        self.deferred = []        # (subquery, the scope it sees) of FROM items, checked after conditions

    def resolve(self, alias):
        """(scope, alias) of a workspace-scoped relation an alias names, innermost first; None otherwise."""
        s = self
        while s:
            if alias in s.rels:
                return (id(s), alias)
            if alias in s.others:
                return None
            s = s.outer
        return None


def deparse(node):
    try:
        return RawStream()(node)
    except Exception:  # noqa: BLE001 - any node we cannot print is still a distinct value
        return repr(node)


class Checker:
    def __init__(self, scoped, where):
        self.scoped = scoped
        self.where = where
        self.problems = []

    # -- FROM items ------------------------------------------------------------------------------
    def add_from(self, scope, item, quals):
        if isinstance(item, ast.RangeVar):
            alias = item.alias.aliasname if item.alias else item.relname
            if item.schemaname in (None, "herald") and item.relname in self.scoped:
                scope.rels[alias] = item.relname
            else:
                scope.others.add(alias)
        elif isinstance(item, ast.JoinExpr):
            self.add_from(scope, item.larg, quals)
            self.add_from(scope, item.rarg, quals)
            if item.quals is not None:
                quals.append(item.quals)
            for col in item.usingClause or ():
                if col.sval == "workspace_id":
                    l, r = self.sides(item.larg), self.sides(item.rarg)
                    for a, b in itertools.product(l, r):
                        scope.eq.join(("ws", id(scope), a), ("ws", id(scope), b))
            if item.alias:
                scope.others.add(item.alias.aliasname)
        elif isinstance(item, ast.RangeSubselect):
            if item.alias:
                scope.others.add(item.alias.aliasname)
            # a LATERAL subquery sees the FROM items before it, like a correlated one; checked once
            # this scope's own conditions are known (see select)
            scope.deferred.append((item.subquery, scope if item.lateral else scope.outer))
        elif isinstance(item, ast.RangeFunction):
            if item.alias:
                scope.others.add(item.alias.aliasname)
            self.walk(item.functions, scope)

    def sides(self, item):
        if isinstance(item, ast.RangeVar):
            if item.schemaname in (None, "herald") and item.relname in self.scoped:
                return [item.alias.aliasname if item.alias else item.relname]
            return []
        if isinstance(item, ast.JoinExpr):
            return self.sides(item.larg) + self.sides(item.rarg)
        return []

    # -- conditions ------------------------------------------------------------------------------
    def key(self, scope, expr):
        if isinstance(expr, ast.ColumnRef):
            names = [f.sval for f in expr.fields if isinstance(f, ast.String)]
            if names and names[-1] == "workspace_id":
                if len(names) >= 2:
                    target = scope.resolve(names[-2])
                elif len(scope.rels) == 1:
                    target = (id(scope), next(iter(scope.rels)))
                else:
                    target = None
                if target:
                    if target[0] != id(scope):
                        scope.correlated.add(target)
                    return ("ws",) + target
        if isinstance(expr, ast.TypeCast):
            return self.key(scope, expr.arg)
        return ("value", deparse(expr))

    def conditions(self, scope, expr):
        if expr is None:
            return
        if isinstance(expr, ast.BoolExpr) and expr.boolop == BoolExprType.AND_EXPR:
            for arg in expr.args:
                self.conditions(scope, arg)
            return
        if isinstance(expr, ast.A_Expr) and expr.kind in (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_NOT_DISTINCT):
            op = expr.name[-1].sval if expr.name else ""
            if (expr.kind == A_Expr_Kind.AEXPR_NOT_DISTINCT or op == "=") \
                    and expr.lexpr is not None and expr.rexpr is not None:
                a, b = self.key(scope, expr.lexpr), self.key(scope, expr.rexpr)
                if a[0] == "ws" or b[0] == "ws":
                    scope.eq.join(a, b)

    # -- statements ------------------------------------------------------------------------------
    def finish(self, scope, node):
        members = [("ws", id(scope), a) for a in scope.rels]
        members += [("ws",) + t for t in scope.correlated]
        # a relation of an enclosing scope counts only when this scope refers to it
        if len(members) < 2:
            return
        groups = {}
        for m in members:
            groups.setdefault(scope.eq.find(m), []).append(m)
        if len(groups) > 1:
            names = []
            for group in groups.values():
                names.append(" = ".join(sorted(f"{a}.workspace_id" for (_, _, a) in group)))
            self.problems.append(f"{self.where}: joins workspace-scoped relations without equating workspace_id "
                                 f"({' | '.join(names)}) in: {shorten(deparse(node))}")

    def select(self, node, outer):
        if node is None:
            return
        if isinstance(node, ast.SelectStmt) and node.op and node.op != 0 and node.larg is not None:
            self.with_clause(node.withClause, outer)
            self.select(node.larg, outer)
            self.select(node.rarg, outer)
            return
        if not isinstance(node, (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt, ast.InsertStmt)):
            self.walk(node, outer)
            return
        self.with_clause(getattr(node, "withClause", None), outer)
        scope = Scope(outer)
        quals = []
        if isinstance(node, ast.SelectStmt):
            for item in node.fromClause or ():
                self.add_from(scope, item, quals)
            quals.append(node.whereClause)
            quals.append(node.havingClause)
            rest = [node.targetList, node.valuesLists, node.groupClause, node.sortClause, node.limitCount]
        elif isinstance(node, ast.UpdateStmt):
            self.add_from(scope, node.relation, quals)
            for item in node.fromClause or ():
                self.add_from(scope, item, quals)
            quals.append(node.whereClause)
            rest = [node.targetList, returning(node)]
        elif isinstance(node, ast.DeleteStmt):
            self.add_from(scope, node.relation, quals)
            for item in node.usingClause or ():
                self.add_from(scope, item, quals)
            quals.append(node.whereClause)
            rest = [returning(node)]
        else:  # INSERT: its SELECT is a scope of its own; ON CONFLICT and RETURNING see the target alone
            self.select(node.selectStmt, outer)
            rest = [node.onConflictClause, returning(node)]
        for q in quals:
            self.conditions(scope, q)
        # any column of an enclosing scope's relation makes this a join with it
        for ref in column_refs(quals + rest):
            names = [f.sval for f in ref.fields if isinstance(f, ast.String)]
            target = scope.resolve(names[-2]) if len(names) >= 2 else None
            if target and target[0] != id(scope):
                scope.correlated.add(target)
        # subqueries in FROM, conditions and targets: correlated ones see this scope
        for sub, sees in scope.deferred:
            self.select(sub, sees)
        for q in quals + rest:
            self.walk(q, scope)
        self.finish(scope, node)

    def with_clause(self, with_clause, outer):
        if with_clause is None:
            return
        for cte in with_clause.ctes or ():
            self.select(cte.ctequery, outer)

    def walk(self, node, scope):
        """Finds the sub-statements (SubLink, nested SELECTs) under any node."""
        if node is None:
            return
        if isinstance(node, (tuple, list)):
            for n in node:
                self.walk(n, scope)
            return
        if isinstance(node, ast.SubLink):
            self.walk(node.testexpr, scope)
            self.select(node.subselect, scope)
            return
        if isinstance(node, (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt, ast.InsertStmt)):
            self.select(node, scope)
            return
        if isinstance(node, ast.Node):
            for name in node:
                self.walk(getattr(node, name), scope)


def column_refs(node):
    """The column references of an expression, not those of the sub-statements inside it."""
    if isinstance(node, (tuple, list)):
        for n in node:
            yield from column_refs(n)
    elif isinstance(node, ast.ColumnRef):
        yield node
    elif isinstance(node, ast.SubLink):
        yield from column_refs(node.testexpr)
    elif isinstance(node, ast.Node) and not isinstance(
            node, (ast.SelectStmt, ast.UpdateStmt, ast.DeleteStmt, ast.InsertStmt)):
        for name in node:
            yield from column_refs(getattr(node, name))


def returning(node):
    """RETURNING of a statement (a list up to PostgreSQL 17's parser, a clause from 18's)."""
    return getattr(node, "returningList", None) or getattr(node, "returningClause", None)


def shorten(text, n=220):
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + " …"


def plpgsql_queries(tree):
    """Every SQL text a PL/pgSQL function body runs."""
    if isinstance(tree, dict):
        if "PLpgSQL_expr" in tree:
            yield tree["PLpgSQL_expr"]["query"]
        for v in tree.values():
            yield from plpgsql_queries(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from plpgsql_queries(v)


def parse_any(text):
    """A PL/pgSQL expression text as statements: a statement, an assignment, or a bare expression."""
    for candidate in (text, re.sub(r"^\s*[\w.\[\]]+\s*:?=", "SELECT ", text, count=1), "SELECT " + text):
        try:
            return pglast.parse_sql(candidate)
        except pglast.parser.ParseError:
            continue
    raise ValueError(f"cannot parse: {shorten(text)}")


def plain_declarations(definition):
    """The function with herald's own types (in its signature and DECLARE section) as `record`: the
    PL/pgSQL parser cannot look types up outside pg_catalog, and a type says nothing about joins."""
    types = re.compile(r"herald\.[\w.]+(%\w+)?(\[\])?", re.I)
    head, sep, body = definition.partition("AS $function$")
    name_end = head.index("(")
    head = head[:name_end] + types.sub("record", head[name_end:])
    body = re.sub(r"\bDECLARE\b.*?\bBEGIN\b", lambda m: types.sub("record", m.group(0)), body,
                  count=1, flags=re.S | re.I)
    return head + sep + body


def statements(conn):
    """(where, parsed statements) of every function and view of the extension."""
    funcs = conn.execute("""
        SELECT p.oid::regprocedure::text, l.lanname, pg_get_functiondef(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
         WHERE n.nspname = 'herald' AND l.lanname IN ('sql', 'plpgsql') AND p.prokind IN ('f', 'p')""").fetchall()
    for name, lang, definition in funcs:
        where = f"function {name}"
        if lang == "plpgsql":
            for query in plpgsql_queries(pglast.parse_plpgsql(plain_declarations(definition))):
                yield where, parse_any(query)
        else:
            create = pglast.parse_sql(definition)[0].stmt
            if create.sql_body is not None:
                yield where, [create.sql_body]
            else:
                body = next(o.arg for o in create.options if o.defname == "as")
                yield where, pglast.parse_sql(body[0].sval)
    views = conn.execute("""
        SELECT c.relname, pg_get_viewdef(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'herald' AND c.relkind IN ('v', 'm')""").fetchall()
    for name, definition in views:
        yield f"view herald.{name}", pglast.parse_sql(definition)


def join_problems(conn, rels, reference):
    """Joins between two workspace-scoped relations (distributed tables, and views over them) without
    workspace_id equated. Reference tables are on every node: a join with one is always local."""
    scoped = {n for n, (_, s) in rels.items() if s} - reference
    problems, checked = [], 0
    for where, stmts in statements(conn):
        checker = Checker(scoped, where)
        for stmt in stmts:
            node = stmt.stmt if isinstance(stmt, ast.RawStmt) else stmt
            checker.walk(node, None)
            checked += 1
        problems += checker.problems
    return problems, checked


# The checker checked: statements it must refuse (True) and accept (False).
CASES = [
    ("SELECT 1 FROM herald.t1 a JOIN herald.t2 b ON b.id = a.id", True),
    ("SELECT 1 FROM herald.t1 a JOIN herald.t2 b ON b.workspace_id = a.workspace_id AND b.id = a.id", False),
    ("SELECT 1 FROM herald.t1 a JOIN herald.t2 b USING (workspace_id, id)", False),
    ("SELECT 1 FROM herald.t1 a, herald.t2 b WHERE a.workspace_id = v_ws AND b.workspace_id = v_ws", False),
    ("SELECT 1 FROM herald.t1 a, herald.t2 b WHERE a.workspace_id = v_ws OR b.workspace_id = v_ws", True),
    ("SELECT 1 FROM herald.t1 a WHERE EXISTS (SELECT 1 FROM herald.t2 b WHERE b.id = a.id)", True),
    ("SELECT 1 FROM herald.t1 a WHERE EXISTS (SELECT 1 FROM herald.t2 b "
     "WHERE b.workspace_id IS NOT DISTINCT FROM a.workspace_id AND b.id = a.id)", False),
    ("SELECT 1 FROM herald.t1 a CROSS JOIN LATERAL (SELECT * FROM herald.t2 b WHERE b.id = a.id LIMIT 1) x", True),
    ("UPDATE herald.t1 a SET x = 1 FROM herald.t2 b WHERE b.id = a.id AND a.workspace_id = $1", True),
    ("DELETE FROM herald.t1 a USING herald.t2 b WHERE b.workspace_id = a.workspace_id AND b.id = a.id", False),
    ("WITH d AS (SELECT * FROM herald.t1 a JOIN herald.t2 b ON a.id = b.id) SELECT * FROM d", True),
    ("SELECT 1 FROM herald.t1 a JOIN herald.other o ON o.id = a.id", False),
    ("SELECT (SELECT count(*) FROM herald.t2 b WHERE b.id = a.id) FROM herald.t1 a", True),
    # a LATERAL subquery inherits the join conditions written after it
    ("SELECT 1 FROM herald.t1 a LEFT JOIN herald.t2 b ON b.workspace_id = a.workspace_id "
     "LEFT JOIN LATERAL (SELECT 1 FROM herald.t1 c WHERE b.id IS NULL AND c.workspace_id = a.workspace_id) x ON true",
     False),
    ("SELECT 1 FROM herald.t1 a LEFT JOIN herald.t2 b ON b.id = a.id "
     "LEFT JOIN LATERAL (SELECT 1 FROM herald.t1 c WHERE b.id IS NULL AND c.workspace_id = a.workspace_id) x ON true",
     True),
]


def selftest():
    wrong = []
    for sql, refused in CASES:
        checker = Checker({"t1", "t2"}, "case")
        for stmt in pglast.parse_sql(sql):
            checker.walk(stmt.stmt, None)
        if bool(checker.problems) != refused:
            wrong.append(f"the checker {'accepts' if refused else 'refuses'}: {sql} {checker.problems}")
    return wrong


def main():
    broken = selftest()
    if broken:
        print("scaling invariants: the checker itself is wrong")
        for b in broken:
            print("  - " + b)
        return 2
    dbname = sys.argv[1] if len(sys.argv) > 1 else "herald_scaling"
    with psycopg.connect(dbname=dbname, autocommit=True) as conn:
        rels = relations(conn)
        problems, distributed = doc_problems(rels)
        tables = {n for n, (k, _) in rels.items() if k in ("r", "p")}
        keys, pending = key_problems(conn, distributed)
        joins, checked = join_problems(conn, rels, tables - distributed)
        problems += keys + joins
    print(f"scaling invariants: {len(distributed)} distributed tables, {len(tables - distributed)} reference "
          f"tables, {checked} statements checked, {len(problems)} problem(s)")
    for p in pending:
        print("  migration step before distributing: " + p)
    for p in problems:
        print("  - " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
