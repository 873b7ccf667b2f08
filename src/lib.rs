//! fhirbox: a FHIR server on PostgreSQL built around a fast, streaming bulk API.
//!
//! A request flows top-down through the modules:
//!
//! - [`http`]: the route table, path normalization, body parsing (JSON/YAML), responses and
//!   the one error type rendered as an OperationOutcome.
//! - [`auth`]: basic authentication of every request, and the AccessPolicy engines.
//! - operations: [`crud`] (single resources), [`bundle`] (`PUT /`, transactions, batches) and
//!   [`bulk`] (`$dump`, `$dump-sql`, `$dump-csv`, `$load`, and the background jobs `$import`
//!   and `$export` with the workers that run them).
//! - [`store`]: every SQL statement (one table per resource type, history, the version
//!   sequence, migrations, COPY, jobs, the Patient compartment); [`format`]: native <-> FHIR
//!   conversion, driven by [`fhir`], the R4 element table (and compartment and search
//!   parameters) generated from the official definitions.
//!
//! Around them: [`config`] (the command line), [`server`] (start-up and shutdown) and
//! [`cluster`] (the managed local PostgreSQL).

pub mod auth;
pub mod bulk;
pub mod bundle;
pub mod cluster;
pub mod config;
pub mod crud;
pub mod fhir;
pub mod format;
pub mod http;
pub mod json_text;
pub mod resource;
pub mod resource_type;
pub mod server;
pub mod store;
