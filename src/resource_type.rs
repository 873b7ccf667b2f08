//! The resource types fhirbox stores: every FHIR R4 resource type plus fhirbox's own.
//!
//! A [`ResourceType`] can only be obtained from this closed list, so a table name derived from
//! it is always one fhirbox created: user input never reaches SQL text through a type name.

use std::collections::HashMap;
use std::fmt;
use std::sync::LazyLock;

use crate::fhir::r4::RESOURCE_TYPES;

/// fhirbox's own resource types (the reference product's names), stored like FHIR resources.
pub const FHIRBOX_TYPES: &[&str] = &[
    "AccessPolicy",
    "Attribute",
    "BulkImportStatus",
    "Client",
    "ViewDefinition",
];

/// The name and tables of one resource type.
#[derive(Debug)]
pub struct TypeInfo {
    name: &'static str,
    /// The table: the type name in lower case (`MedicationRequest` -> `medicationrequest`).
    table: String,
    history_table: String,
    fhir: bool,
}

static REGISTRY: LazyLock<Vec<TypeInfo>> = LazyLock::new(|| {
    let fhir = RESOURCE_TYPES.iter().map(|name| (*name, true));
    let own = FHIRBOX_TYPES.iter().map(|name| (*name, false));
    let mut types: Vec<TypeInfo> = fhir
        .chain(own)
        .map(|(name, fhir)| TypeInfo {
            name,
            table: name.to_ascii_lowercase(),
            history_table: format!("{}_history", name.to_ascii_lowercase()),
            fhir,
        })
        .collect();
    types.sort_by_key(|t| t.name);
    types
});

static BY_NAME: LazyLock<HashMap<&'static str, ResourceType>> = LazyLock::new(|| {
    REGISTRY
        .iter()
        .map(|info| (info.name, ResourceType(info)))
        .collect()
});

/// A known resource type. Cheap to copy; compares by identity of its registry entry.
#[derive(Clone, Copy)]
pub struct ResourceType(&'static TypeInfo);

impl ResourceType {
    /// The type with exactly this name (case-sensitive, as in FHIR), if fhirbox stores it.
    pub fn parse(name: &str) -> Option<ResourceType> {
        BY_NAME.get(name).copied()
    }

    /// Every stored type, sorted by name.
    pub fn all() -> impl Iterator<Item = ResourceType> {
        REGISTRY.iter().map(ResourceType)
    }

    pub fn name(self) -> &'static str {
        self.0.name
    }

    /// The SQL identifier of the current-version table, already quoted (`"group"` is reserved).
    pub fn table(self) -> String {
        format!("\"{}\"", self.0.table)
    }

    /// The SQL identifier of the history table, already quoted.
    pub fn history_table(self) -> String {
        format!("\"{}\"", self.0.history_table)
    }

    /// The unquoted table name, for catalog lookups.
    pub fn table_name(self) -> &'static str {
        &self.0.table
    }

    /// Whether this is a FHIR R4 resource type (not one of fhirbox's own).
    pub fn is_fhir(self) -> bool {
        self.0.fhir
    }

    /// Whether this type configures the server or records its jobs (`Client`, `AccessPolicy`,
    /// `Attribute`, `BulkImportStatus`): a token's scope must name it, `*` never covers it.
    pub fn is_server_config(self) -> bool {
        !self.0.fhir && self.0.name != "ViewDefinition"
    }
}

impl PartialEq for ResourceType {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for ResourceType {}

impl std::hash::Hash for ResourceType {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.name.hash(state);
    }
}

impl fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_r4_and_own_types_and_nothing_else() {
        assert_eq!(
            ResourceType::parse("Patient").map(|t| t.table_name()),
            Some("patient")
        );
        assert_eq!(
            ResourceType::parse("MedicationRequest").map(|t| t.table()),
            Some("\"medicationrequest\"".to_string())
        );
        assert!(ResourceType::parse("Client").is_some_and(|t| !t.is_fhir()));
        assert!(ResourceType::parse("patient").is_none());
        assert!(ResourceType::parse("Patient; drop table patient").is_none());
        assert!(ResourceType::parse("DomainResource").is_none());
        assert_eq!(
            ResourceType::all().count(),
            RESOURCE_TYPES.len() + FHIRBOX_TYPES.len()
        );
    }
}
