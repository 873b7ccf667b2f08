//! The SQL functions compiled views call (`views::sql` writes the calls), created or replaced
//! at every start-up with the schema.

/// The one helper compiled views call, created (or replaced) at every start-up: a column
/// that is not a `collection` takes one value, and a row that gives it several is an error
/// naming the column (the spec's rule; PostgreSQL has no `RAISE` in an expression).
pub const FUNCTIONS_DDL: &str = "
CREATE OR REPLACE FUNCTION fhirbox_view_one(items jsonb, what text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
BEGIN
  IF jsonb_array_length(items) > 1 THEN
    RAISE EXCEPTION '%: gives % values in a row; a column that is not a collection takes one (set \"collection\": true, or pick one with first() or where(...))',
      what, jsonb_array_length(items) USING ERRCODE = '22023';
  END IF;
  RETURN items -> 0;
END
$fn$;

-- Counts the rows a materialization writes and their bytes (in the transaction's settings),
-- and stops it past its bounds: a table is written inside PostgreSQL, where fhirbox cannot
-- count, so the statement counts itself.
CREATE OR REPLACE FUNCTION fhirbox_view_guard(bytes integer, max_rows bigint, max_bytes bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
  rows_so_far bigint := coalesce(nullif(current_setting('fhirbox.guard_rows', true), ''), '0')::bigint + 1;
  bytes_so_far bigint := coalesce(nullif(current_setting('fhirbox.guard_bytes', true), ''), '0')::bigint + bytes;
BEGIN
  IF rows_so_far > max_rows THEN
    RAISE EXCEPTION 'the output passed % rows, the most allowed (--view-max-rows)', max_rows
      USING ERRCODE = '54000';
  END IF;
  IF bytes_so_far > max_bytes THEN
    RAISE EXCEPTION 'the output passed % bytes, the most allowed (--view-max-bytes)', max_bytes
      USING ERRCODE = '54000';
  END IF;
  PERFORM set_config('fhirbox.guard_rows', rows_so_far::text, true);
  PERFORM set_config('fhirbox.guard_bytes', bytes_so_far::text, true);
  RETURN true;
END
$fn$;
";
