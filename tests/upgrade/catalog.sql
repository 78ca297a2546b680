-- Everything the herald extension consists of in this database, as sorted text lines, so that two
-- databases can be compared with diff: a fresh install and an older release upgraded with
-- ALTER EXTENSION herald UPDATE must print the same lines (tests/upgrade.sh).
-- Names, never OIDs. Columns are listed in their physical order (an upgrade that adds a column puts it
-- last, so the fresh install's CREATE TABLE must have it last too: then SELECT * and the row types
-- agree whatever way a database got to this release).
\pset format unaligned
\pset tuples_only on
\pset footer off

WITH ext AS (
    SELECT oid, extversion, extconfig, extcondition FROM pg_extension WHERE extname = 'herald'
), herald_ns AS (
    SELECT oid FROM pg_namespace WHERE nspname = 'herald'
), rels AS (
    SELECT c.* FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM herald_ns)
), lines(kind, name, detail) AS (
    SELECT 'extension', 'herald', 'version ' || extversion FROM ext
    UNION ALL
    -- membership: every object the extension owns (pg_describe_object prints names)
    SELECT 'member', pg_describe_object(d.classid, d.objid, d.objsubid), ''
      FROM pg_depend d, ext
     WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
    UNION ALL
    -- what pg_dump carries: config tables and sequences with their filters
    SELECT 'config_dump', c.relid::regclass::text, coalesce(c.cond, '')
      FROM ext, unnest(ext.extconfig, ext.extcondition) AS c(relid, cond)
    UNION ALL
    SELECT 'schema', 'herald', 'acl ' || coalesce(n.nspacl::text, '')
      FROM pg_namespace n WHERE n.nspname = 'herald'
    UNION ALL
    SELECT 'relation', r.relname,
           format('kind %s persistence %s options %s acl %s rls %s force_rls %s',
                  r.relkind, r.relpersistence, r.reloptions, r.relacl, r.relrowsecurity, r.relforcerowsecurity)
      FROM rels r
    UNION ALL
    SELECT 'column', r.relname || '.' || lpad(row_number() OVER (PARTITION BY r.oid ORDER BY a.attnum)::text, 3, '0'),
           format('%s %s notnull %s default %s identity %s generated %s collation %s acl %s',
                  a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
                  CASE WHEN a.attcollation <> 0 THEN a.attcollation::regcollation::text END, a.attacl)
      FROM rels r
      JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
     WHERE r.relkind IN ('r', 'p', 'v', 'm', 'c', 'f')
    UNION ALL
    SELECT 'constraint', cl.relname || '.' || co.conname, pg_get_constraintdef(co.oid)
      FROM pg_constraint co JOIN rels cl ON cl.oid = co.conrelid
    UNION ALL
    SELECT 'index', i.relname, pg_get_indexdef(i.oid)
      FROM rels i WHERE i.relkind IN ('i', 'I')
    UNION ALL
    SELECT 'sequence', s.relname,
           format('type %s start %s increment %s min %s max %s cache %s cycle %s owned_by %s',
                  sq.seqtypid::regtype, sq.seqstart, sq.seqincrement, sq.seqmin, sq.seqmax, sq.seqcache, sq.seqcycle,
                  (SELECT dc.refobjid::regclass || '.' || da.attname
                     FROM pg_depend dc
                     JOIN pg_attribute da ON da.attrelid = dc.refobjid AND da.attnum = dc.refobjsubid
                    WHERE dc.classid = 'pg_class'::regclass AND dc.objid = s.oid AND dc.deptype IN ('a', 'i')
                      AND dc.refclassid = 'pg_class'::regclass))
      FROM rels s JOIN pg_sequence sq ON sq.seqrelid = s.oid
    UNION ALL
    SELECT 'view', v.relname, pg_get_viewdef(v.oid)
      FROM rels v WHERE v.relkind IN ('v', 'm')
    UNION ALL
    SELECT 'trigger', t.tgrelid::regclass || '.' || t.tgname, pg_get_triggerdef(t.oid) || ' enabled ' || t.tgenabled::text
      FROM pg_trigger t JOIN rels r ON r.oid = t.tgrelid
     WHERE NOT t.tgisinternal
    UNION ALL
    SELECT 'policy', p.tablename || '.' || p.policyname,
           format('%s %s roles %s using %s check %s', p.permissive, p.cmd, p.roles, p.qual, p.with_check)
      FROM pg_policies p WHERE p.schemaname = 'herald'
    UNION ALL
    -- functions: the whole definition (language, volatility, SECURITY DEFINER, SET clauses, body),
    -- owner-independent, plus who may call it
    SELECT 'function', p.oid::regprocedure::text,
           CASE WHEN p.prokind = 'a' THEN 'aggregate' ELSE pg_get_functiondef(p.oid) END
           || E'\n  acl ' || coalesce(p.proacl::text, '(default)')
      FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM herald_ns)
    UNION ALL
    SELECT 'type', t.typname,
           format('type %s category %s acl %s', t.typtype, t.typcategory, t.typacl)
      FROM pg_type t
     WHERE t.typnamespace = (SELECT oid FROM herald_ns)
       AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
       AND t.typelem = 0
    UNION ALL
    SELECT 'enum', t.typname || '.' || lpad(e.enumsortorder::text, 6, '0'), e.enumlabel
      FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
     WHERE t.typnamespace = (SELECT oid FROM herald_ns)
    UNION ALL
    SELECT 'comment', pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description
      FROM pg_description d
      JOIN pg_depend x ON x.classid = d.classoid AND x.objid = d.objoid AND x.deptype = 'e'
     WHERE x.refobjid = (SELECT oid FROM ext)
    UNION ALL
    -- roles are cluster-wide (both databases see the same ones), but their grants on herald's objects
    -- are in the acl columns above
    SELECT 'role', r.rolname,
           format('login %s super %s inherit %s createrole %s bypassrls %s', r.rolcanlogin, r.rolsuper,
                  r.rolinherit, r.rolcreaterole, r.rolbypassrls)
      FROM pg_roles r WHERE r.rolname LIKE 'herald\_%'
)
SELECT kind || ' ' || name || coalesce(': ' || nullif(detail, ''), '')
  FROM lines
 ORDER BY kind, name, detail;
