//! The SQL functions search conditions call (`search::sql` writes the calls), created or
//! replaced at every start-up with the schema. They look at one value of a parameter's
//! expression, in the native format, whatever its datatype turns out to be at run time (a
//! choice element such as `Observation.effective` is a dateTime in one resource and a
//! Period in the next).

pub const FUNCTIONS_DDL: &str = r#"
-- Case- and accent-insensitive form of a string, as FHIR's string search compares:
-- decomposed (NFD), combining marks dropped, lower case.
CREATE OR REPLACE FUNCTION fhirbox_search_norm(t text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
  SELECT lower(regexp_replace(normalize(t, NFD), '[\u0300-\u036f]', '', 'g'))
$fn$;

-- The strings a string parameter matches in one value: the value itself, or every part of a
-- HumanName (family, given, prefix, suffix, text) or an Address (line, city, district,
-- state, postalCode, country, text).
CREATE OR REPLACE FUNCTION fhirbox_search_strings(v jsonb) RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
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
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
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
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
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
-- time zone, UTC. NULL for text that is not a date.
CREATE OR REPLACE FUNCTION fhirbox_search_instants(t text, OUT low timestamptz, OUT high timestamptz)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
DECLARE
  m text[];
  base timestamptz;
BEGIN
  m := regexp_match(t, '^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$');
  IF m IS NULL THEN
    RETURN;
  END IF;
  base := make_timestamptz(m[1]::int, coalesce(m[2], '01')::int, coalesce(m[3], '01')::int,
                           coalesce(m[4], '00')::int, coalesce(m[5], '00')::int,
                           coalesce(m[6], '00')::int + coalesce(m[7], '0')::numeric::double precision,
                           CASE WHEN m[8] IS NULL OR m[8] = 'Z' THEN 'UTC' ELSE m[8] END);
  low := base;
  high := CASE
    WHEN m[2] IS NULL THEN base + interval '1 year'
    WHEN m[3] IS NULL THEN base + interval '1 month'
    WHEN m[4] IS NULL THEN base + interval '1 day'
    WHEN m[6] IS NULL THEN base + interval '1 minute'
    WHEN m[7] IS NULL THEN base + interval '1 second'
    ELSE base + make_interval(secs => power(10, -(length(m[7]) - 1)))
  END;
EXCEPTION WHEN others THEN
  low := NULL;
  high := NULL;
END
$fn$;

-- The ranges one value of a date parameter covers: a date/dateTime/instant string; a
-- Period from its start's low to its end's high (open where missing); a Timing's events.
CREATE OR REPLACE FUNCTION fhirbox_search_ranges(v jsonb, OUT low timestamptz, OUT high timestamptz) RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $fn$
  SELECT i.low, i.high FROM fhirbox_search_instants(v #>> '{}') i
   WHERE jsonb_typeof(v) = 'string' AND i.low IS NOT NULL
  UNION ALL
  SELECT coalesce((SELECT s.low FROM fhirbox_search_instants(v ->> 'start') s), '-infinity'),
         coalesce((SELECT e.high FROM fhirbox_search_instants(v ->> 'end') e), 'infinity')
   WHERE jsonb_typeof(v) = 'object' AND (v ? 'start' OR v ? 'end')
  UNION ALL
  SELECT i.low, i.high
    FROM jsonb_array_elements_text(CASE WHEN jsonb_typeof(v) = 'object' AND jsonb_typeof(v -> 'event') = 'array' THEN v -> 'event' ELSE '[]' END) e,
         fhirbox_search_instants(e) i
   WHERE i.low IS NOT NULL
$fn$;
"#;
