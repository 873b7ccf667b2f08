//! The bulk API's operations: streaming exports and imports at the speed of PostgreSQL's own
//! COPY, in bounded memory.

pub mod dump;
pub mod dump_csv;
pub mod dump_sql;
pub mod gzip;
pub mod import;
pub mod lines;
pub mod load;
pub mod native_line;
pub mod params;
pub mod prepare;
pub mod source;
