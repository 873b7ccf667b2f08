//! Token search parameters (`identifier=system|value`, `category=laboratory`), shared by
//! search (`GET /fhir/Group?identifier=...`) and `$export`'s `_typeFilter`.
//!
//! Which parameters exist comes from the generated table [`TOKEN_PARAMS`] (the R4
//! SearchParameters whose expression is a plain path to a code, Coding, CodeableConcept or
//! Identifier). A value is matched by a jsonpath built from that table's paths (never from a
//! request), with the request's system and code passed as jsonpath variables.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fhir::r4::TOKEN_PARAMS;

/// A token parameter's element paths with their FHIR types (`("category", "CodeableConcept")`).
pub type TokenPaths = &'static [(&'static str, &'static str)];

/// The token search parameter `code` of a type, if fhirbox supports it: its element paths
/// with their FHIR types.
pub fn token_param(type_name: &str, code: &str) -> Option<TokenPaths> {
    TOKEN_PARAMS
        .iter()
        .find(|(name, param, _)| *name == type_name && *param == code)
        .map(|(_, _, paths)| *paths)
}

/// The names of a type's token search parameters.
pub fn token_params_of(type_name: &str) -> impl Iterator<Item = &'static str> + '_ {
    TOKEN_PARAMS
        .iter()
        .filter(move |(name, _, _)| *name == type_name)
        .map(|(_, param, _)| *param)
}

/// One token value: `code`, `system|code`, `|code` (no system) or `system|`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub system: Option<String>,
    pub code: Option<String>,
    /// `|code`: the coding must have no system.
    pub no_system: bool,
}

impl Token {
    /// Reads one value as FHIR search writes it.
    pub fn parse(text: &str) -> Token {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        match text.split_once('|') {
            Some((system, code)) => Token {
                system: non_empty(system),
                code: non_empty(code),
                no_system: system.is_empty(),
            },
            None => Token {
                system: None,
                code: non_empty(text),
                no_system: false,
            },
        }
    }

    /// The jsonpath variables of [`token_path`] for this value.
    pub fn vars(&self) -> Value {
        json!({"system": self.system, "code": self.code, "nosys": self.no_system})
    }
}

/// The jsonpath that finds a token at a path of FHIR type `kind`, with the variables `$code`,
/// `$system` (JSON null: any) and `$nosys` (true: the coding must have no system).
pub fn token_path(path: &str, kind: &str) -> String {
    let coded = |code_field: &str| {
        format!(
            "($system == null || @.system == $system) && ($code == null || @.{code_field} == $code) \
             && ($nosys == false || !(exists(@.system)))"
        )
    };
    match kind {
        "CodeableConcept" => format!("lax $.{path}.coding ? ({})", coded("code")),
        "Coding" => format!("lax $.{path} ? ({})", coded("code")),
        "Identifier" => format!("lax $.{path} ? ({})", coded("value")),
        // A plain code has no system.
        _ => format!("lax $.{path} ? (($code == null || @ == $code) && $system == null)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_fhir_search_writes_them() {
        assert_eq!(
            Token::parse("|x"),
            Token {
                system: None,
                code: Some("x".into()),
                no_system: true
            }
        );
        assert_eq!(
            Token::parse("http://loinc.org|"),
            Token {
                system: Some("http://loinc.org".into()),
                code: None,
                no_system: false
            }
        );
        assert_eq!(
            token_param("Group", "identifier"),
            Some(&[("identifier", "Identifier")][..])
        );
        assert!(token_params_of("Observation").any(|p| p == "category"));
    }
}
