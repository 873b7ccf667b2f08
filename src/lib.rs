//! fhirbox: a FHIR server on PostgreSQL built around a fast, streaming bulk API.
//!
//! A request flows top-down through three layers (`docs/architecture.md` has the rules):
//!
//! - [`http`]: the route table, path normalization, extractors, responses (streamed bodies
//!   and their compression in one place), and the one error type rendered as an
//!   OperationOutcome, with every mapping of a module's error to it. May call everything below.
//! - operations: [`crud`] (single resources), [`bundle`] (`PUT /`, transactions, batches),
//!   [`bulk`] (`$dump`, `$dump-sql`, `$dump-csv`, `$load`, and the background jobs `$import`
//!   and `$export` with the workers that run them) and [`auth`] (credentials, AccessPolicies).
//!   They call `store` and `format`, never `http` or axum. SQL on FHIR [`views`] compile
//!   their statements with [`fhirpath`], the FHIRPath-to-SQL front end (which runs nothing).
//! - [`store`]: every SQL statement and every connection's life (pool, dedicated connections
//!   that are cancelled and closed when abandoned, transactions, COPY, jobs, migrations, the
//!   Patient compartment, and the read replicas that take the bulk reads); [`format`]: native
//!   <-> FHIR conversion, driven by [`fhir`], the R4 element table (and compartment and search
//!   parameters) generated from the official definitions, with the rules [`formats`] reads
//!   from the Attribute resources and hands it. They call nothing above them, and [`metrics`]
//!   (counted from everywhere) calls nothing of fhirbox's.
//!
//! Around them: [`config`] (the command line), [`app`] (a running fhirbox's parts, built
//! from its settings), [`server`] (start-up and shutdown), [`cluster`] (the managed local
//! PostgreSQL) and [`objects`] (S3-compatible buckets: the clients behind export storage and
//! `s3://` sources).

pub mod app;
pub mod auth;
pub mod bulk;
pub mod bundle;
pub mod cluster;
pub mod config;
pub mod crud;
pub mod fhir;
pub mod fhirpath;
pub mod format;
pub mod formats;
pub mod http;
pub mod json_text;
pub mod metrics;
pub mod objects;
pub mod resource;
pub mod resource_type;
pub mod search;
pub mod server;
pub mod store;
pub mod views;
