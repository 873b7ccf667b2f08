//! SMART scopes for system access (Backend Services): `system/Patient.rs`, `system/*.rs`
//! (v2: `c`reate, `r`ead, `u`pdate, `d`elete, `s`earch), and the v1 forms `system/*.read`
//! (= `rs`), `system/*.write` (= `cud`) and `system/*.*` (= `cruds`).
//!
//! A token's scopes narrow what its Client's AccessPolicies allow: a request needs a scope
//! that covers its resource type and its interaction. Granted scopes are the intersection of
//! what the client asks for and what its registration allows.

use std::fmt;

use crate::resource_type::ResourceType;

/// An interaction a scope may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Interaction {
    fn bit(self) -> u8 {
        match self {
            Interaction::Create => 1,
            Interaction::Read => 2,
            Interaction::Update => 4,
            Interaction::Delete => 8,
            Interaction::Search => 16,
        }
    }

    /// Read and search: what a bulk read of a type needs.
    pub const READ_ALL: [Interaction; 2] = [Interaction::Read, Interaction::Search];
    /// Create and update: what a bulk write of a type needs.
    pub const WRITE_ALL: [Interaction; 2] = [Interaction::Create, Interaction::Update];
}

const ALL: u8 = 31;

/// One `system/` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every type (`*`).
    resource_type: Option<ResourceType>,
    /// Bits of [`Interaction`].
    permissions: u8,
}

/// The scopes of a token (or of a registration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

impl Scope {
    /// Parses one scope; `None` for anything that is not a `system/` resource scope fhirbox
    /// knows (such scopes are ignored, never widened into something else).
    pub fn parse(text: &str) -> Option<Scope> {
        let rest = text.strip_prefix("system/")?;
        let (resource, permissions) = rest.split_once('.')?;
        let resource_type = match resource {
            "*" => None,
            name => Some(ResourceType::parse(name)?),
        };
        let permissions = match permissions {
            "read" => Interaction::Read.bit() | Interaction::Search.bit(),
            "write" => {
                Interaction::Create.bit() | Interaction::Update.bit() | Interaction::Delete.bit()
            }
            "*" => ALL,
            letters => v2_permissions(letters)?,
        };
        Some(Scope {
            resource_type,
            permissions,
        })
    }

    fn intersect(&self, other: &Scope) -> Option<Scope> {
        let resource_type = match (self.resource_type, other.resource_type) {
            // `*` never stands for fhirbox's configuration, on either side.
            (None, Some(rt)) | (Some(rt), None) if rt.is_server_config() => return None,
            (None, rt) | (rt, None) => rt,
            (Some(a), Some(b)) if a == b => Some(a),
            _ => return None,
        };
        let permissions = self.permissions & other.permissions;
        (permissions != 0).then_some(Scope {
            resource_type,
            permissions,
        })
    }

    fn covers(&self, rt: Option<ResourceType>, interaction: Interaction) -> bool {
        let type_ok = match (self.resource_type, rt) {
            // fhirbox's configuration only by a scope that names it.
            (None, Some(wanted)) => !wanted.is_server_config(),
            (None, None) => true,
            (Some(mine), Some(wanted)) => mine == wanted,
            (Some(_), None) => false,
        };
        type_ok && self.permissions & interaction.bit() != 0
    }
}

/// `cruds` in that order, each at most once, at least one.
fn v2_permissions(letters: &str) -> Option<u8> {
    let mut bits = 0;
    let mut last = None;
    for letter in letters.chars() {
        let position = "cruds".find(letter)?;
        if last.is_some_and(|l| position <= l) {
            return None;
        }
        last = Some(position);
        bits |= 1 << position;
    }
    (bits != 0).then_some(bits)
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let resource = self.resource_type.map_or("*", |rt| rt.name());
        let letters: String = "cruds"
            .chars()
            .enumerate()
            .filter(|(i, _)| self.permissions & (1 << i) != 0)
            .map(|(_, c)| c)
            .collect();
        write!(f, "system/{resource}.{letters}")
    }
}

impl Scopes {
    /// The scopes of a space-separated list (unknown ones left out).
    pub fn parse(text: &str) -> Scopes {
        Scopes(text.split_whitespace().filter_map(Scope::parse).collect())
    }

    /// The scopes of a list of strings (a Client's registration).
    pub fn from_list<'a>(items: impl IntoIterator<Item = &'a str>) -> Scopes {
        Scopes(items.into_iter().filter_map(Scope::parse).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What both allow: each requested scope narrowed by the registered ones.
    pub fn intersect(&self, registered: &Scopes) -> Scopes {
        let mut granted: Vec<Scope> = Vec::new();
        for asked in &self.0 {
            for allowed in &registered.0 {
                if let Some(scope) = asked.intersect(allowed) {
                    if !granted.contains(&scope) {
                        granted.push(scope);
                    }
                }
            }
        }
        Scopes(granted)
    }

    /// Whether some scope allows `interaction` on `rt` (`None`: on every type, as a request
    /// that is not about one type needs).
    pub fn allow(&self, rt: Option<ResourceType>, interaction: Interaction) -> bool {
        self.0.iter().any(|scope| scope.covers(rt, interaction))
    }

    /// Whether some scope allows every one of `interactions` on `rt`, each.
    pub fn allow_all(&self, rt: Option<ResourceType>, interactions: &[Interaction]) -> bool {
        interactions.iter().all(|i| self.allow(rt, *i))
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<String> = self.0.iter().map(Scope::to_string).collect();
        write!(f, "{}", texts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(name: &str) -> Option<ResourceType> {
        ResourceType::parse(name)
    }

    #[test]
    fn v2_and_v1_forms() {
        assert_eq!(
            Scope::parse("system/Patient.rs")
                .map(|s| s.to_string())
                .as_deref(),
            Some("system/Patient.rs")
        );
        assert_eq!(
            Scope::parse("system/*.read")
                .map(|s| s.to_string())
                .as_deref(),
            Some("system/*.rs")
        );
        assert_eq!(
            Scope::parse("system/*.*").map(|s| s.to_string()).as_deref(),
            Some("system/*.cruds")
        );
        assert_eq!(
            Scope::parse("system/*.write")
                .map(|s| s.to_string())
                .as_deref(),
            Some("system/*.cud")
        );
        for bad in [
            "system/Patient.sr",
            "system/Nope.rs",
            "patient/*.rs",
            "system/*.rr",
            "launch",
            "system/*.",
        ] {
            assert_eq!(Scope::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_grant_is_the_intersection() {
        let registered = Scopes::parse("system/*.rs");
        assert_eq!(
            Scopes::parse("system/*.cruds")
                .intersect(&registered)
                .to_string(),
            "system/*.rs"
        );
        assert_eq!(
            Scopes::parse("system/Patient.r")
                .intersect(&registered)
                .to_string(),
            "system/Patient.r"
        );
        assert!(Scopes::parse("system/*.cud")
            .intersect(&registered)
            .is_empty());
        let narrow = Scopes::parse("system/Patient.rs");
        assert_eq!(
            Scopes::parse("system/*.rs").intersect(&narrow).to_string(),
            "system/Patient.rs"
        );
    }

    #[test]
    fn what_a_token_allows() {
        let scopes = Scopes::parse("system/Patient.rs");
        assert!(scopes.allow(rt("Patient"), Interaction::Read));
        assert!(!scopes.allow(rt("Observation"), Interaction::Read));
        assert!(!scopes.allow(rt("Patient"), Interaction::Update));
        assert!(!scopes.allow(None, Interaction::Read), "not every type");
        assert!(Scopes::parse("system/*.rs").allow_all(None, &Interaction::READ_ALL));
    }

    #[test]
    fn fhirbox_configuration_needs_a_scope_that_names_it() {
        let all = Scopes::parse("system/*.cruds");
        for own in ["Client", "AccessPolicy", "Attribute", "BulkImportStatus"] {
            assert!(!all.allow(rt(own), Interaction::Read), "{own}");
            assert!(Scopes::parse(&format!("system/{own}.r")).allow(rt(own), Interaction::Read));
        }
        assert!(all.allow(rt("ViewDefinition"), Interaction::Read));
        let asked = Scopes::parse("system/Client.rs");
        assert!(
            asked.intersect(&all).is_empty(),
            "a * registration grants no Client"
        );
        assert!(all.allow(rt("Patient"), Interaction::Read));
    }
}
