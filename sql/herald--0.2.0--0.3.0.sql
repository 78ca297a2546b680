-- herald 0.2.0 -> 0.3.0
-- (each change of this release adds its line here: what changed, for whom)
\echo Use "ALTER EXTENSION herald UPDATE TO '0.3.0'" to load this file. \quit
