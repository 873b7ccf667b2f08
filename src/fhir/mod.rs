//! FHIR R4 knowledge compiled into the server: the resource types and, for every type, its
//! elements (choice elements, References, arrays, contentReferences), generated from the
//! official definitions in `fhir-r4/` by `src/bin/codegen.rs`.

pub mod meta;
#[rustfmt::skip]
pub mod r4;
