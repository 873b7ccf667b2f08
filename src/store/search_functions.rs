//! The SQL functions search conditions call (`search::sql` writes the calls), created or
//! replaced at every start-up with the schema. They look at one value of a parameter's
//! expression, in the native format, whatever its datatype turns out to be at run time (a
//! choice element such as `Observation.effective` is a dateTime in one resource and a
//! Period in the next).

pub const FUNCTIONS_DDL: &str = r#"
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
-- time zone, UTC. No row for text that is not a date (or names a day that does not exist,
-- or year 0). Plain SQL, so that PostgreSQL inlines it; CASE keeps the casts and make_*
-- from seeing text that is not a date. The shape is checked by one regular expression
-- without captures and the fields are read at their fixed places: 5x faster than capturing
-- them with regexp_match (28 us a value), which sorting by a date does for every match.
-- `OFFSET 0` keeps `ok` and `base` subqueries of their own, computed once: pulled up, each
-- would be computed again for each use (the regular expression eight times; `base` 5x
-- slower for `high`, which the sort keys and prefixes use).
CREATE OR REPLACE FUNCTION fhirbox_search_instant_range(t text, OUT low timestamptz, OUT high timestamptz) RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
  SELECT v.base,
         CASE
           WHEN f.mo IS NULL THEN v.base + interval '1 year'
           WHEN f.d IS NULL THEN v.base + interval '1 month'
           WHEN f.h IS NULL THEN v.base + interval '1 day'
           WHEN f.frac IS NULL AND NOT f.secs THEN v.base + interval '1 minute'
           WHEN f.frac IS NULL THEN v.base + interval '1 second'
           ELSE v.base + make_interval(secs => power(10, -(length(f.frac) - 1)))
         END
    FROM (SELECT t ~ '^\d{4}(-\d\d(-\d\d(T\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)?)?)?)?$' AS ok OFFSET 0) AS c,
         LATERAL (SELECT CASE WHEN c.ok THEN substr(t, 1, 4)::int END AS y,
                         CASE WHEN c.ok AND length(t) >= 7 THEN substr(t, 6, 2)::int END AS mo,
                         CASE WHEN c.ok AND length(t) >= 10 THEN substr(t, 9, 2)::int END AS d,
                         CASE WHEN c.ok AND length(t) >= 16 THEN substr(t, 12, 2)::int END AS h,
                         CASE WHEN c.ok AND length(t) >= 16 THEN substr(t, 15, 2)::int END AS mi,
                         substr(t, 17, 1) = ':' AS secs,
                         CASE WHEN c.ok AND substr(t, 17, 1) = ':' THEN substr(t, 18, 2)::int ELSE 0 END AS s,
                         CASE WHEN c.ok AND substr(t, 20, 1) = '.' THEN substring(t from '\.\d+') END AS frac,
                         CASE WHEN length(t) > 16 AND substr(t, length(t) - 5, 1) IN ('+', '-') THEN right(t, 6) ELSE 'UTC' END AS zone) AS f,
         LATERAL (SELECT CASE
                    WHEN NOT c.ok OR f.y < 1 THEN NULL
                    WHEN coalesce(f.mo, 1) NOT BETWEEN 1 AND 12 THEN NULL
                    WHEN coalesce(f.d, 1) NOT BETWEEN 1 AND
                         extract(day FROM make_date(f.y, coalesce(f.mo, 1), 1) + interval '1 month' - interval '1 day')
                      THEN NULL
                    WHEN coalesce(f.h, 0) > 23 OR coalesce(f.mi, 0) > 59 OR f.s > 59 THEN NULL
                    ELSE make_timestamptz(f.y, coalesce(f.mo, 1), coalesce(f.d, 1), coalesce(f.h, 0),
                                          coalesce(f.mi, 0), f.s + coalesce(f.frac, '0')::numeric::double precision, f.zone)
                  END AS base OFFSET 0) AS v
   WHERE c.ok AND v.base IS NOT NULL
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
"#;
