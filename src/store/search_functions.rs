//! The SQL functions search conditions call (`search::sql` writes the calls), created or
//! replaced at every start-up with the schema. They look at one value of a parameter's
//! expression, in the native format, whatever its datatype turns out to be at run time (a
//! choice element such as `Observation.effective` is a dateTime in one resource and a
//! Period in the next).

/// `sql` with every call of one of fhirbox's functions (`fhirbox_...(`) qualified by
/// `schema` (quoted). Autovacuum's ANALYZE, and every maintenance command from PostgreSQL 17
/// on, evaluates index expressions with only `pg_catalog` on the search_path: an index
/// function that calls ours unqualified fails there (statistics never refresh). Qualified
/// names keep SQL functions inlinable and PL/pgSQL plans cached, which a `SET search_path`
/// on the function would not (it made a Patient load twice as slow). The SQL is fhirbox's
/// own (these definitions, bodies compiled from R4 expressions), never a request's.
pub fn qualified(sql: &str, schema: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(at) = rest.find("fhirbox_") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let name_len = from
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(from.len());
        let starts_name = !out
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '"');
        if starts_name && from[name_len..].starts_with('(') {
            out.push_str(schema);
            out.push('.');
        }
        out.push_str(&from[..name_len]);
        rest = &from[name_len..];
    }
    out.push_str(rest);
    out
}

/// The functions below, created in (and calling each other through) `schema`.
pub fn functions_ddl(schema: &str) -> String {
    qualified(FUNCTIONS_DDL, schema)
}

const FUNCTIONS_DDL: &str = r#"
-- (Set-returning functions are plain SQL and not STRICT, so that PostgreSQL inlines them.)

-- Case- and accent-insensitive form of a string, as FHIR's string search compares:
-- decomposed (NFD), combining marks dropped, lower case.
CREATE OR REPLACE FUNCTION fhirbox_search_norm(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT lower(regexp_replace(normalize(t, NFD), '[\u0300-\u036f]', '', 'g'))
$fn$;

-- The strings a string parameter matches in one value: the value itself, or every part of a
-- HumanName (family, given, prefix, suffix, text) or an Address (line, city, district,
-- state, postalCode, country, text).
CREATE OR REPLACE FUNCTION fhirbox_search_strings(v jsonb) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT v #>> '{}' WHERE jsonb_typeof(v) = 'string'
  UNION ALL
  SELECT v ->> k FROM unnest(ARRAY['family', 'text', 'city', 'district', 'state', 'postalCode', 'country']) k
   WHERE jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> k) = 'string'
  UNION ALL
  SELECT x FROM unnest(ARRAY['given', 'prefix', 'suffix', 'line']) k,
                jsonb_array_elements_text(CASE WHEN jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> k) = 'array' THEN v -> k ELSE '[]' END) x
$fn$;

-- The (system, code) pairs a token parameter matches in one value: a code, string, uri,
-- boolean or id as a code without system; a Coding; every Coding of a CodeableConcept; an
-- Identifier's (system, value); a ContactPoint's value.
CREATE OR REPLACE FUNCTION fhirbox_search_tokens(v jsonb, OUT system text, OUT code text) RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT NULL::text, v #>> '{}' WHERE jsonb_typeof(v) IN ('string', 'boolean', 'number')
  UNION ALL
  SELECT c ->> 'system', c ->> 'code'
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'coding') = 'array' THEN v -> 'coding' ELSE '[]' END) c
  UNION ALL
  SELECT v ->> 'system', v ->> 'code'
   WHERE jsonb_typeof(v) = 'object' AND (v ? 'code' OR v ? 'system') AND NOT v ? 'value' AND NOT v ? 'coding'
  UNION ALL
  SELECT CASE WHEN v ->> 'system' IN ('phone', 'fax', 'email', 'pager', 'url', 'sms', 'other') AND NOT v ? 'assigner' AND NOT v ? 'type' THEN NULL ELSE v ->> 'system' END,
         v ->> 'value'
   WHERE jsonb_typeof(v) = 'object' AND v ? 'value' AND jsonb_typeof(v -> 'value') = 'string'
$fn$;

-- The texts a token's :text modifier matches: a CodeableConcept's text and its Codings'
-- displays, a Coding's display, an Identifier's type text.
CREATE OR REPLACE FUNCTION fhirbox_search_token_texts(v jsonb) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT v ->> 'text' WHERE jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'text') = 'string'
  UNION ALL
  SELECT v ->> 'display' WHERE jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'display') = 'string'
  UNION ALL
  SELECT c ->> 'display'
    FROM jsonb_array_elements(CASE WHEN jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'coding') = 'array' THEN v -> 'coding' ELSE '[]' END) c
   WHERE c ? 'display'
  UNION ALL
  SELECT v #>> '{type,text}' WHERE jsonb_typeof(v) = 'object' AND jsonb_typeof(v #> '{type,text}') = 'string'
$fn$;

-- The instant range [low, high) a date, dateTime or instant written with any precision
-- covers: '2013' is the whole year, '2013-01-14T10:00:00+01:00' that second. Without a
-- time zone, UTC. NULLs for text that is not a date (or names a day that does not exist,
-- or year 0). PL/pgSQL of simple expressions only (no query per call): the index on a date
-- parameter computes it for every row written, and this took ~10 us where SQL functions
-- PostgreSQL cannot inline took ~100 us (a Patient $load ran at 10k rows a second). The
-- shape is checked by one regular expression without captures and the fields are read at
-- their fixed places (capturing them with regexp_match took 28 us a value).
CREATE OR REPLACE FUNCTION fhirbox_search_instant(t text, OUT low timestamptz, OUT high timestamptz)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
  n int := length(t);
  y int; mo int; d int; h int := 0; mi int := 0; s int := 0; frac text; zone text := 'UTC';
BEGIN
  IF t IS NULL OR t !~ '^\d{4}(-\d\d(-\d\d(T\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)?)?)?)?$' THEN
    RETURN;
  END IF;
  y := substr(t, 1, 4)::int;
  IF y < 1 THEN RETURN; END IF;
  IF n >= 7 THEN
    mo := substr(t, 6, 2)::int;
    IF mo NOT BETWEEN 1 AND 12 THEN RETURN; END IF;
  END IF;
  IF n >= 10 THEN
    d := substr(t, 9, 2)::int;
    IF d NOT BETWEEN 1 AND extract(day FROM make_date(y, mo, 1) + interval '1 month' - interval '1 day') THEN
      RETURN;
    END IF;
  END IF;
  IF n >= 16 THEN
    h := substr(t, 12, 2)::int;
    mi := substr(t, 15, 2)::int;
    IF substr(t, 17, 1) = ':' THEN s := substr(t, 18, 2)::int; END IF;
    IF h > 23 OR mi > 59 OR s > 59 THEN RETURN; END IF;
    IF substr(t, 20, 1) = '.' THEN frac := substring(t from '\.\d+'); END IF;
    IF n > 16 AND substr(t, n - 5, 1) IN ('+', '-') THEN zone := right(t, 6); END IF;
  END IF;
  low := make_timestamptz(y, coalesce(mo, 1), coalesce(d, 1), h, mi,
                          s + coalesce(frac, '0')::numeric::double precision, zone);
  high := CASE
    WHEN mo IS NULL THEN low + interval '1 year'
    WHEN d IS NULL THEN low + interval '1 month'
    WHEN n < 16 THEN low + interval '1 day'
    WHEN frac IS NULL AND substr(t, 17, 1) <> ':' THEN low + interval '1 minute'
    WHEN frac IS NULL THEN low + interval '1 second'
    ELSE low + make_interval(secs => power(10, -(length(frac) - 1)))
  END;
END
$fn$;

-- The same as a row source (none for text that is not a date), for joins.
CREATE OR REPLACE FUNCTION fhirbox_search_instant_range(t text, OUT low timestamptz, OUT high timestamptz) RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT i.low, i.high FROM fhirbox_search_instant(t) AS i WHERE i.low IS NOT NULL
$fn$;

-- The ranges one value of a date parameter covers: a date/dateTime/instant string; a
-- Period from its start's low to its end's high (open where missing); a Timing's events.
CREATE OR REPLACE FUNCTION fhirbox_search_ranges(v jsonb, OUT low timestamptz, OUT high timestamptz) RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT i.low, i.high FROM fhirbox_search_instant_range(v #>> '{}') i
   WHERE jsonb_typeof(v) = 'string' AND i.low IS NOT NULL
  UNION ALL
  SELECT coalesce((SELECT s.low FROM fhirbox_search_instant_range(v ->> 'start') s), '-infinity'),
         coalesce((SELECT e.high FROM fhirbox_search_instant_range(v ->> 'end') e), 'infinity')
   WHERE jsonb_typeof(v) = 'object' AND (v ? 'start' OR v ? 'end')
  UNION ALL
  SELECT i.low, i.high
    FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'event') = 'array' THEN v -> 'event' ELSE '[]' END) e,
         fhirbox_search_instant_range(e) i
   WHERE i.low IS NOT NULL
$fn$;

-- The one range spanning every instant of a date parameter's values (a JSON array of
-- what `fhirbox_search_ranges` reads, the same rows), NULL when there is none: what a date
-- index holds. PL/pgSQL of simple expressions, for the reason given above: this is
-- computed for every row written to an indexed table.
CREATE OR REPLACE FUNCTION fhirbox_search_span(vals jsonb) RETURNS tstzrange
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
DECLARE
  v jsonb; r record; lo timestamptz; hi timestamptz; l timestamptz; h timestamptz;
BEGIN
  FOR i IN 0 .. coalesce(jsonb_array_length(vals), 0) - 1 LOOP
    v := vals -> i;
    IF jsonb_typeof(v) = 'string' THEN
      r := fhirbox_search_instant(v #>> '{}');
      IF r.low IS NOT NULL THEN
        lo := least(lo, r.low, r.high); hi := greatest(hi, r.low, r.high);
      END IF;
    ELSIF jsonb_typeof(v) = 'object' THEN
      IF v ? 'start' OR v ? 'end' THEN
        l := coalesce((fhirbox_search_instant(v ->> 'start')).low, '-infinity');
        h := coalesce((fhirbox_search_instant(v ->> 'end')).high, 'infinity');
        lo := least(lo, l, h); hi := greatest(hi, l, h);
      END IF;
      IF jsonb_typeof(v -> 'event') = 'array' THEN
        FOR j IN 0 .. jsonb_array_length(v -> 'event') - 1 LOOP
          r := fhirbox_search_instant(v -> 'event' ->> j);
          IF r.low IS NOT NULL THEN
            lo := least(lo, r.low, r.high); hi := greatest(hi, r.low, r.high);
          END IF;
        END LOOP;
      END IF;
    END IF;
  END LOOP;
  IF lo IS NULL THEN RETURN NULL; END IF;
  RETURN tstzrange(lo, hi, '[]');
END
$fn$;
"#;

#[cfg(test)]
mod tests {
    use super::qualified;

    #[test]
    fn calls_of_our_functions_are_qualified_and_nothing_else() {
        assert_eq!(
            qualified(
                "SELECT fhirbox_search_span(x), y.fhirbox_col, 'fhirbox_x', \"fhirbox_q\"(1), \
                 myfhirbox_f(2), fhirbox_search_norm(fhirbox_a(t))",
                "\"s\""
            ),
            "SELECT \"s\".fhirbox_search_span(x), y.fhirbox_col, 'fhirbox_x', \"fhirbox_q\"(1), \
             myfhirbox_f(2), \"s\".fhirbox_search_norm(\"s\".fhirbox_a(t))"
        );
    }
}
