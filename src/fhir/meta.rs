//! The shape of the generated FHIR R4 element table (`r4.rs`) and lookups into it.

use std::collections::HashMap;
use std::sync::LazyLock;

use super::r4;

/// One resource type, datatype or backbone element (named by its path, e.g.
/// `Observation.component`) and its elements.
#[derive(Debug)]
pub struct TypeDef {
    pub name: &'static str,
    pub elements: &'static [Element],
}

/// A token search parameter the generated table lists: (resource type, code, its element
/// paths with their FHIR types).
pub type TokenParam = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// One R4 SearchParameter for one base type, as the generated table lists it.
#[derive(Debug)]
pub struct SearchParam {
    /// The resource type (or `Resource` / `DomainResource` for the common parameters).
    pub base: &'static str,
    pub code: &'static str,
    /// `string`, `token`, `date`, `reference`, `number`, `quantity`, `uri`, `composite`,
    /// `special`.
    pub kind: &'static str,
    /// The FHIRPath expression, only the parts of its union that apply to `base` (empty for
    /// the few parameters R4 defines without one).
    pub expression: &'static str,
    /// For a reference parameter: the types it may point at.
    pub targets: &'static [&'static str],
    /// For a composite parameter: its components' types and expressions (relative to each
    /// value of `expression`), in the order a value lists them (`code$value`).
    pub components: &'static [(&'static str, &'static str)],
}

/// One element of a [`TypeDef`].
#[derive(Debug)]
pub struct Element {
    /// The element name as in JSON; for a choice element, the name without `[x]` (`value`).
    pub name: &'static str,
    pub kind: Kind,
    /// Whether the element is an array in FHIR JSON.
    pub array: bool,
}

/// What an element holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A primitive (`string`, `dateTime`, or a `System.*` type for `id`/`extension.url`).
    Primitive(&'static str),
    /// A complex datatype (`Quantity`) or a backbone element described by its path.
    Complex(&'static str),
    /// A Reference, with the resource types it may target (empty: any).
    Reference(&'static [&'static str]),
    /// A choice element `name[x]`, with the allowed FHIR type codes (`Quantity`, `dateTime`).
    Choice(&'static [&'static str]),
    /// A whole resource (`contained`, `Bundle.entry.resource`).
    Resource,
    /// An element defined elsewhere (`Questionnaire.item.item` -> `Questionnaire.item`).
    ContentRef(&'static str),
}

/// A [`TypeDef`] with what conversion needs precomputed: its choice elements, so that an
/// element name that is not in the table (`valueQuantity`) is matched against few candidates.
#[derive(Debug)]
pub struct TypeIndex {
    pub def: &'static TypeDef,
    pub choices: Vec<&'static Element>,
}

/// Keyed with foldhash's fixed (unseeded) hasher: the keys are the R4 type names, nothing a
/// client chooses, and SipHash was 5% of the bulk exports' conversion (profiled).
static BY_NAME: LazyLock<HashMap<&'static str, TypeIndex, foldhash::fast::FixedState>> =
    LazyLock::new(|| {
        r4::TYPES
            .iter()
            .map(|def| {
                let choices = def
                    .elements
                    .iter()
                    .filter(|e| matches!(e.kind, Kind::Choice(_)))
                    .collect();
                (def.name, TypeIndex { def, choices })
            })
            .collect()
    });

/// Looks up a resource type, datatype or backbone path.
pub fn type_def(name: &str) -> Option<&'static TypeDef> {
    BY_NAME.get(name).map(|index| index.def)
}

/// Looks up a type with its precomputed index.
pub fn type_index(name: &str) -> Option<&'static TypeIndex> {
    BY_NAME.get(name)
}

impl TypeDef {
    /// The element with that exact JSON name (choice elements by their base name).
    pub fn element(&self, name: &str) -> Option<&'static Element> {
        self.element_named(name.as_bytes())
    }

    /// [`TypeDef::element`] by the name's bytes (a JSON key, as the text scanner has it).
    pub fn element_named(&self, name: &[u8]) -> Option<&'static Element> {
        // A scan that compares lengths and first bytes before whole names: faster than a
        // binary search's string comparisons on these short lists (the element lookup was a
        // quarter of the bulk exports' conversion, profiled).
        let first = name.first()?;
        self.elements.iter().find(|e| {
            let candidate = e.name.as_bytes();
            candidate.len() == name.len() && candidate.first() == Some(first) && candidate == name
        })
    }
}

/// Whether `name` is a concrete FHIR R4 resource type.
pub fn is_r4_resource_type(name: &str) -> bool {
    r4::RESOURCE_TYPES.binary_search(&name).is_ok()
}
