//! The SQL functions of the token modifiers that read stored terminology: `:in` and
//! `:not-in` (the codes of a stored ValueSet) and `:below` and `:above` (a code and its
//! descendants or ancestors in a stored CodeSystem's hierarchy). Created or replaced at every
//! start-up with the schema.
//!
//! A search calls them once, as an uncorrelated scalar subquery (an InitPlan), so a
//! ValueSet is expanded once per search, not once per row. What they return is a code set as
//! one jsonb object that the search's condition looks each token up in
//! (`search::terminology`):
//! `{"s": {"system|code": 1}, "w": {"system": 1}, "c": {"code": 1}}`: exact codes, whole
//! code systems (a ValueSet including a system without naming codes), and the codes alone
//! (what a plain `code` element, which has no system, matches).
//!
//! What they cannot answer exactly (a ValueSet that is not stored, two of one url, a filter
//! other than `is-a`/`descendent-of`) raises SQLSTATE `FB400` with a message for the client:
//! `StoreError::refusal` makes it a 400. The resources are read in the native format (a
//! property's `valueCode` is `value.code`).

/// The SQLSTATE the functions raise for a search they cannot answer exactly.
pub const REFUSAL: &str = "FB400";

pub const FUNCTIONS_DDL: &str = r#"
-- Every (parent, code) pair of a CodeSystem's hierarchy: nested concepts, and the `parent`
-- and `subsumedBy` properties. Top-level concepts have a NULL parent.
CREATE OR REPLACE FUNCTION fhirbox_search_cs_edges(cs jsonb, OUT parent text, OUT code text) RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  WITH RECURSIVE walk(parent, c) AS (
    SELECT NULL::text, c
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(cs -> 'concept') = 'array' THEN cs -> 'concept' ELSE '[]' END) c
    UNION ALL
    SELECT w.c ->> 'code', k
      FROM walk w, jsonb_array_elements(CASE WHEN jsonb_typeof(w.c -> 'concept') = 'array' THEN w.c -> 'concept' ELSE '[]' END) k
  )
  SELECT parent, c ->> 'code' FROM walk WHERE jsonb_typeof(c -> 'code') = 'string'
  UNION ALL
  SELECT p #>> '{value,code}', c ->> 'code'
    FROM walk, jsonb_array_elements(CASE WHEN jsonb_typeof(c -> 'property') = 'array' THEN c -> 'property' ELSE '[]' END) p
   WHERE p ->> 'code' IN ('parent', 'subsumedBy') AND jsonb_typeof(p #> '{value,code}') = 'string'
     AND jsonb_typeof(c -> 'code') = 'string'
$fn$;

-- The one stored CodeSystem of `url`, or a refusal naming what is missing.
CREATE OR REPLACE FUNCTION fhirbox_search_code_system(url text, why text) RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $fn$
DECLARE
  found jsonb[];
BEGIN
  SELECT array_agg(resource) INTO found FROM codesystem WHERE resource ->> 'url' = url;
  IF found IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      'no CodeSystem with url %s is stored here: %s needs its hierarchy (store the CodeSystem first)', url, why);
  END IF;
  IF cardinality(found) > 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      '%s CodeSystems with url %s are stored: %s cannot tell which hierarchy to use', cardinality(found), url, why);
  END IF;
  RETURN found[1];
END
$fn$;

-- `code` and every code below it (`below`) or above it in the hierarchy of the stored
-- CodeSystem `url`; `with_self` false leaves `code` out (a `descendent-of` filter).
CREATE OR REPLACE FUNCTION fhirbox_search_cs_related(url text, code text, below boolean, with_self boolean, why text) RETURNS SETOF text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
  WITH RECURSIVE edges AS MATERIALIZED (
    SELECT * FROM fhirbox_search_cs_edges(fhirbox_search_code_system(url, why)) WHERE parent IS NOT NULL
  ), related(code) AS (
    SELECT code
    UNION
    SELECT CASE WHEN below THEN e.code ELSE e.parent END
      FROM related r JOIN edges e ON r.code = CASE WHEN below THEN e.parent ELSE e.code END
  )
  SELECT r.code FROM related r WHERE with_self OR r.code <> fhirbox_search_cs_related.code
$fn$;

-- The codes (system, code) of one ValueSet's include or exclude list; a NULL code is every
-- code of the system. `depth` counts ValueSets imported through others.
CREATE OR REPLACE FUNCTION fhirbox_search_vs_part(items jsonb, owner text, depth int, OUT system text, OUT code text) RETURNS SETOF record
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $fn$
DECLARE
  inc jsonb;
  f jsonb;
  imported text;
BEGIN
  FOR inc IN SELECT jsonb_array_elements(CASE WHEN jsonb_typeof(items) = 'array' THEN items ELSE '[]' END) LOOP
    IF inc ? 'valueSet' THEN
      IF inc ? 'system' OR inc ? 'concept' OR inc ? 'filter' OR jsonb_array_length(inc -> 'valueSet') <> 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
          'ValueSet %s intersects value sets (an include with valueSet and more): not supported by :in here', owner);
      END IF;
      imported := inc #>> '{valueSet,0}';
      RETURN QUERY SELECT * FROM fhirbox_search_vs_codes(false, split_part(imported, '|', 1),
        nullif(substr(imported, length(split_part(imported, '|', 1)) + 2), ''), depth + 1);
      CONTINUE;
    END IF;
    system := inc ->> 'system';
    IF system IS NULL THEN
      RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
        'ValueSet %s includes or excludes codes without a system: not supported by :in here', owner);
    END IF;
    IF inc ? 'concept' AND inc ? 'filter' THEN
      RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
        'ValueSet %s has an include with both concept and filter: not supported by :in here', owner);
    ELSIF inc ? 'concept' THEN
      RETURN QUERY SELECT system, c ->> 'code' FROM jsonb_array_elements(inc -> 'concept') c
                    WHERE jsonb_typeof(c -> 'code') = 'string';
    ELSIF inc ? 'filter' THEN
      IF jsonb_array_length(inc -> 'filter') <> 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
          'ValueSet %s combines several filters in one include: not supported by :in here', owner);
      END IF;
      f := inc #> '{filter,0}';
      IF f ->> 'property' <> 'concept' OR f ->> 'op' NOT IN ('is-a', 'descendent-of') OR f ->> 'value' IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
          'ValueSet %s filters by "%s %s": :in here supports only "concept is-a" and "concept descendent-of"',
          owner, f ->> 'property', f ->> 'op');
      END IF;
      RETURN QUERY SELECT system, r FROM fhirbox_search_cs_related(system, f ->> 'value', true,
        f ->> 'op' = 'is-a', format('the %s filter of ValueSet %s', f ->> 'op', owner)) r;
    ELSE
      code := NULL;
      RETURN NEXT;
    END IF;
  END LOOP;
END
$fn$;

-- The codes of the stored ValueSet with id `ref` (`by_id`) or with url `ref` (and `version`
-- when given): its expansion when it has one, else its compose.
CREATE OR REPLACE FUNCTION fhirbox_search_vs_codes(by_id boolean, ref text, version text, depth int, OUT system text, OUT code text) RETURNS SETOF record
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $fn$
DECLARE
  found jsonb[];
  vs jsonb;
  owner text;
BEGIN
  IF depth > 8 THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      'ValueSet %s: value sets import each other more than 8 deep (a cycle?)', ref);
  END IF;
  IF by_id THEN
    SELECT array_agg(resource) INTO found FROM valueset WHERE id = ref;
  ELSE
    SELECT array_agg(resource) INTO found FROM valueset
     WHERE resource ->> 'url' = ref AND (version IS NULL OR resource ->> 'version' = version);
  END IF;
  owner := CASE WHEN by_id THEN 'ValueSet/' || ref ELSE ref || coalesce('|' || version, '') END;
  IF found IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      'no ValueSet %s is stored here: :in and :not-in read the codes of a stored ValueSet', owner);
  END IF;
  IF cardinality(found) > 1 THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      '%s ValueSets with url %s are stored: name one by its version (url|version) or as ValueSet/[id]',
      cardinality(found), ref);
  END IF;
  vs := found[1];
  IF jsonb_typeof(vs -> 'expansion') = 'object' THEN
    RETURN QUERY SELECT e ->> 'system', e ->> 'code'
      FROM jsonb_path_query(vs -> 'expansion', 'lax $.**.contains[*]') e
     WHERE jsonb_typeof(e -> 'code') = 'string';
    RETURN;
  END IF;
  IF jsonb_typeof(vs -> 'compose') IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      'ValueSet %s has neither an expansion nor a compose: it names no codes', owner);
  END IF;
  IF EXISTS (SELECT 1 FROM fhirbox_search_vs_part(vs #> '{compose,exclude}', owner, depth) x)
     AND EXISTS (SELECT 1 FROM fhirbox_search_vs_part(vs #> '{compose,include}', owner, depth) i WHERE i.code IS NULL) THEN
    RAISE EXCEPTION USING ERRCODE = 'FB400', MESSAGE = format(
      'ValueSet %s excludes codes from a whole code system it includes: not supported by :in here', owner);
  END IF;
  RETURN QUERY
    SELECT * FROM fhirbox_search_vs_part(vs #> '{compose,include}', owner, depth)
    EXCEPT
    SELECT * FROM fhirbox_search_vs_part(vs #> '{compose,exclude}', owner, depth);
END
$fn$;

-- A code set, as the module's comment describes it.
CREATE OR REPLACE FUNCTION fhirbox_search_code_set(system text[], code text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT jsonb_build_object(
    's', coalesce((SELECT jsonb_object_agg(s || '|' || c, 1) FROM unnest(system, code) AS x(s, c) WHERE s IS NOT NULL AND c IS NOT NULL), '{}'),
    'w', coalesce((SELECT jsonb_object_agg(s, 1) FROM unnest(system, code) AS x(s, c) WHERE s IS NOT NULL AND c IS NULL), '{}'),
    'c', coalesce((SELECT jsonb_object_agg(c, 1) FROM unnest(system, code) AS x(s, c) WHERE c IS NOT NULL), '{}'))
$fn$;

-- `:in` and `:not-in`: the code set of a stored ValueSet.
CREATE OR REPLACE FUNCTION fhirbox_search_value_set(by_id boolean, ref text, version text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
  SELECT fhirbox_search_code_set(array_agg(system), array_agg(code))
    FROM fhirbox_search_vs_codes(by_id, ref, version, 0)
$fn$;

-- `:below` and `:above`: `code` of `system` and the codes below (or above) it in the stored
-- CodeSystem of that url.
CREATE OR REPLACE FUNCTION fhirbox_search_hierarchy(system text, code text, below boolean) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
  SELECT fhirbox_search_code_set(array_agg(system), array_agg(r))
    FROM fhirbox_search_cs_related(system, code, below, true, CASE WHEN below THEN ':below' ELSE ':above' END) r
$fn$;
"#;
