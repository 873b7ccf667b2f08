//! Generates `src/fhir/r4.rs`, the compiled-in FHIR R4 element table, from the pristine
//! R4 tables in `fhir-r4/fhirpath-r4-model/` (see `fhir-r4/README.md` for why those and not the
//! Medplum bundles). One fact the pristine tables lack, whether a contentReference element
//! (`Questionnaire.item.item`) repeats, comes from the StructureDefinitions in
//! `fhir-r4/profiles-resources.json.gz`, which the README says match R4 outside the
//! deviations it lists (none of which is a contentReference).
//!
//! Usage: `cargo run --bin codegen -- fhir-r4 src/fhir/r4.rs`
//!
//! The table lists, for every resource type, datatype and backbone element, each of its
//! elements with its kind: primitive, complex (a datatype or a backbone path), Reference (with
//! the allowed targets), choice (`value[x]`, with the allowed type codes), contained resource, or
//! contentReference. `src/fhir/meta.rs` defines the types the table is written in.
//!
//! It also lists, from `fhir-r4/compartmentdefinition-patient.json` and the pristine R4
//! SearchParameters, the element paths that put a resource in a patient's compartment, and
//! the token search parameters whose expression is a plain element path (what `$export`'s
//! `_typeFilter` evaluates in SQL).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        bail!("usage: codegen <fhir-r4 dir> <output .rs file>");
    };
    let mut model = Model::read(&Path::new(input).join("fhirpath-r4-model"))?;
    model
        .add_content_reference_cardinality(&Path::new(input).join("profiles-resources.json.gz"))?;
    let mut source = render(&model)?;
    let search = SearchModel::read(Path::new(input))?;
    source.push_str(&search.render(&model)?);
    std::fs::write(output, source).with_context(|| format!("writing {output}"))?;
    eprintln!("wrote {output}");
    Ok(())
}

/// The four pristine tables, as read from disk.
struct Model {
    type_to_parent: BTreeMap<String, String>,
    path_to_type: BTreeMap<String, Value>,
    choice_paths: BTreeMap<String, Vec<String>>,
    repeating: BTreeSet<String>,
    defined_elsewhere: BTreeMap<String, String>,
    /// Root elements with `min` of at least 1, by resource type (from the snapshots).
    mandatory: BTreeMap<String, BTreeSet<String>>,
    summary: BTreeMap<String, BTreeSet<String>>,
}

impl Model {
    fn read(dir: &Path) -> Result<Model> {
        let load = |name: &str| -> Result<Value> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        };
        Ok(Model {
            type_to_parent: serde_json::from_value(load("type2Parent.json")?)?,
            path_to_type: serde_json::from_value(load("path2Type.json")?)?,
            choice_paths: serde_json::from_value(load("choiceTypePaths.json")?)?,
            repeating: serde_json::from_value(load("path2Repeating.json")?)?,
            defined_elsewhere: serde_json::from_value(load("pathsDefinedElsewhere.json")?)?,
            mandatory: BTreeMap::new(),
            summary: BTreeMap::new(),
        })
    }

    /// Marks the contentReference elements that repeat (`max: "*"` in the snapshots), and
    /// notes the mandatory root elements of each resource type (`min` >= 1: what `$export`'s
    /// `_elements` keeps whether asked or not). Only elements the pristine tables also have
    /// count, which leaves out the Medplum additions.
    fn add_content_reference_cardinality(&mut self, bundle_path: &Path) -> Result<()> {
        use std::io::Read as _;
        let file = std::fs::File::open(bundle_path)
            .with_context(|| format!("opening {}", bundle_path.display()))?;
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", bundle_path.display()))?;
        let bundle: Value = serde_json::from_str(&text)?;
        let entries = bundle["entry"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        for entry in entries {
            let elements = entry["resource"]["snapshot"]["element"].as_array();
            for element in elements.map(Vec::as_slice).unwrap_or_default() {
                let Some(path) = element["path"].as_str() else {
                    continue;
                };
                if element.get("contentReference").is_some()
                    && self.defined_elsewhere.contains_key(path)
                    && element["max"] == "*"
                {
                    self.repeating.insert(path.to_string());
                }
                let pristine = self.path_to_type.contains_key(path)
                    || self.choice_paths.contains_key(path.trim_end_matches("[x]"));
                if let Some((base, name)) = path.split_once('.') {
                    let name = name.trim_end_matches("[x]").to_string();
                    if name.contains('.') || !pristine {
                        continue;
                    }
                    if element["min"].as_u64().unwrap_or(0) >= 1 {
                        self.mandatory
                            .entry(base.to_string())
                            .or_default()
                            .insert(name.clone());
                    }
                    if element["isSummary"] == true {
                        self.summary
                            .entry(base.to_string())
                            .or_default()
                            .insert(name);
                    }
                }
            }
        }
        Ok(())
    }

    fn ancestors(&self, name: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut current = name;
        while let Some(parent) = self.type_to_parent.get(current) {
            out.push(parent.as_str());
            current = parent;
        }
        out
    }

    /// Concrete resource types: everything that descends from `Resource`, minus the abstract
    /// `DomainResource`.
    fn resource_types(&self) -> Vec<&str> {
        self.type_to_parent
            .keys()
            .map(String::as_str)
            .filter(|name| *name != "DomainResource" && self.ancestors(name).contains(&"Resource"))
            .collect()
    }

    /// Maps a choice suffix as written in element names (`DateTime`, `Quantity`) to the FHIR
    /// type code (`dateTime`, `Quantity`): the type whose name matches case-insensitively.
    fn type_code(&self, suffix: &str) -> Result<String> {
        let mut matches = self
            .type_to_parent
            .keys()
            .filter(|name| name.eq_ignore_ascii_case(suffix));
        match (matches.next(), matches.next()) {
            (Some(name), None) => Ok(name.clone()),
            _ => bail!("choice suffix {suffix} names no single FHIR type"),
        }
    }
}

/// One element as it will be written into the table.
struct Element {
    name: String,
    kind: String,
    array: bool,
}

fn render(model: &Model) -> Result<String> {
    let mut contexts: BTreeMap<String, Vec<Element>> = BTreeMap::new();
    // Concrete choice expansions (`Observation.valueQuantity`) are listed in path2Type next to
    // their choice (`Observation.value`); the choice entry describes them all. Only a suffix
    // that is one of the choice's types makes an expansion: `participantEffectiveDescription`
    // is an element of its own beside `participantEffective[x]`.
    let is_choice_expansion = |path: &str| {
        model.choice_paths.iter().any(|(choice, suffixes)| {
            path.strip_prefix(choice.as_str())
                .is_some_and(|rest| suffixes.iter().any(|suffix| suffix == rest))
        })
    };
    let mut all_paths: BTreeSet<&str> = model.path_to_type.keys().map(String::as_str).collect();
    all_paths.extend(model.choice_paths.keys().map(String::as_str));
    all_paths.extend(model.defined_elsewhere.keys().map(String::as_str));

    for path in all_paths {
        let Some((parent, name)) = path.rsplit_once('.') else {
            continue;
        };
        if is_choice_expansion(path) {
            continue;
        }
        let kind = if let Some(suffixes) = model.choice_paths.get(path) {
            let codes = suffixes
                .iter()
                .map(|s| model.type_code(s))
                .collect::<Result<Vec<_>>>()?;
            format!("Kind::Choice(&[{}])", quoted_list(&codes))
        } else if let Some(target) = model.defined_elsewhere.get(path) {
            format!("Kind::ContentRef({target:?})")
        } else {
            element_kind(path, &model.path_to_type[path])?
        };
        contexts
            .entry(parent.to_string())
            .or_default()
            .push(Element {
                name: name.to_string(),
                kind,
                array: model.repeating.contains(path),
            });
    }

    let mut out = String::new();
    writeln!(
        out,
        "//! FHIR R4 (4.0.1) element table. @generated by src/bin/codegen.rs: do not edit."
    )?;
    writeln!(
        out,
        "//! Regenerate with: cargo run --bin codegen -- fhir-r4 src/fhir/r4.rs"
    )?;
    writeln!(
        out,
        "//! Source: fhir-r4/fhirpath-r4-model/ (pristine R4 tables; see fhir-r4/README.md)."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "use super::meta::{{Element, Kind, SearchParam, TokenParam, TypeDef}};"
    )?;
    writeln!(out)?;
    let resources = model.resource_types();
    writeln!(out, "/// Every concrete FHIR R4 resource type, sorted.")?;
    writeln!(out, "pub static RESOURCE_TYPES: &[&str] = &[")?;
    for name in &resources {
        writeln!(out, "    {name:?},")?;
    }
    writeln!(out, "];")?;
    writeln!(out)?;
    writeln!(out, "/// Every resource type, datatype and backbone element path with its elements, sorted by name.")?;
    writeln!(out, "pub static TYPES: &[TypeDef] = &[")?;
    for (context, elements) in &contexts {
        writeln!(out, "    TypeDef {{ name: {context:?}, elements: &[")?;
        for e in elements {
            writeln!(
                out,
                "        Element {{ name: {:?}, kind: {}, array: {} }},",
                e.name, e.kind, e.array
            )?;
        }
        writeln!(out, "    ] }},")?;
    }
    writeln!(out, "];")?;
    writeln!(out)?;
    writeln!(
        out,
        "/// The mandatory root elements (`min` >= 1) of each resource type that has any; a"
    )?;
    writeln!(out, "/// choice element by its name without `[x]`.")?;
    writeln!(
        out,
        "pub static MANDATORY_ELEMENTS: &[(&str, &[&str])] = &["
    )?;
    for (base, names) in &model.mandatory {
        if resources.contains(&base.as_str()) {
            let names: Vec<String> = names.iter().cloned().collect();
            writeln!(out, "    ({base:?}, &[{}]),", quoted_list(&names))?;
        }
    }
    writeln!(out, "];")?;
    writeln!(out)?;
    writeln!(
        out,
        "/// The summary root elements (`isSummary`, what `_summary=true` keeps) of each resource"
    )?;
    writeln!(out, "/// type; a choice element by its name without `[x]`.")?;
    writeln!(out, "pub static SUMMARY_ELEMENTS: &[(&str, &[&str])] = &[")?;
    for (base, names) in &model.summary {
        if resources.contains(&base.as_str()) {
            let names: Vec<String> = names.iter().cloned().collect();
            writeln!(out, "    ({base:?}, &[{}]),", quoted_list(&names))?;
        }
    }
    writeln!(out, "];")?;
    Ok(out)
}

/// The kind of a non-choice element, from its path2Type entry.
fn element_kind(path: &str, entry: &Value) -> Result<String> {
    if let Some(object) = entry.as_object() {
        let code = object
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match code {
            "Reference" => {}
            // A canonical carries its target profiles too, but it is a plain URI string.
            "canonical" => return Ok("Kind::Primitive(\"canonical\")".to_string()),
            _ => bail!("{path}: unexpected object entry with code {code:?}"),
        }
        let targets: Vec<String> = object
            .get("refType")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        return Ok(format!("Kind::Reference(&[{}])", quoted_list(&targets)));
    }
    let Some(type_name) = entry.as_str() else {
        bail!("{path}: path2Type entry is neither a string nor an object");
    };
    Ok(match type_name {
        // Backbone and anonymous elements are described by their own path.
        "BackboneElement" | "Element" => format!("Kind::Complex({path:?})"),
        "Resource" => "Kind::Resource".to_string(),
        "Reference" => "Kind::Reference(&[])".to_string(),
        system if system.starts_with("System.") => format!("Kind::Primitive({system:?})"),
        name if name.starts_with(|c: char| c.is_ascii_lowercase()) => {
            format!("Kind::Primitive({name:?})")
        }
        name => format!("Kind::Complex({name:?})"),
    })
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Patient CompartmentDefinition and the SearchParameters, as read from disk.
struct SearchModel {
    /// Compartment member type -> the search parameter codes that link it to a patient.
    compartment: BTreeMap<String, Vec<String>>,
    /// (base type, code) -> (search type, expression).
    params: BTreeMap<(String, String), (String, String)>,
    /// (base type, code) -> the resource types a reference parameter may point at.
    targets: BTreeMap<(String, String), Vec<String>>,
    /// (base type, code) -> a composite parameter's components: (type, expression).
    components: BTreeMap<(String, String), Vec<(String, String)>>,
}

impl SearchModel {
    fn read(dir: &Path) -> Result<SearchModel> {
        use std::io::Read as _;
        let path = dir.join("compartmentdefinition-patient.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let definition: Value = serde_json::from_str(&text)?;
        let mut compartment = BTreeMap::new();
        for entry in definition["resource"].as_array().into_iter().flatten() {
            let params: Vec<String> = entry["param"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect();
            if let (Some(code), false) = (entry["code"].as_str(), params.is_empty()) {
                compartment.insert(code.to_string(), params);
            }
        }
        let path = dir.join("search-parameters.pristine-4.0.1.json.gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?,
        )
        .read_to_string(&mut text)?;
        let bundle: Value = serde_json::from_str(&text)?;
        let mut params = BTreeMap::new();
        let mut targets = BTreeMap::new();
        let mut components = BTreeMap::new();
        // A component names its parameter by canonical URL: its type comes from there.
        let kinds: BTreeMap<&str, &str> = bundle["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                Some((
                    e["resource"]["url"].as_str()?,
                    e["resource"]["type"].as_str()?,
                ))
            })
            .collect();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let resource = &entry["resource"];
            let (Some(code), Some(kind)) = (resource["code"].as_str(), resource["type"].as_str())
            else {
                continue;
            };
            let expression = resource["expression"].as_str().unwrap_or_default();
            let to: Vec<String> = resource["target"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            let mut parts = Vec::new();
            for component in resource["component"].as_array().into_iter().flatten() {
                let definition = component["definition"].as_str().unwrap_or_default();
                // Some R4 composites name a per-type URL that only exists as a shared
                // parameter (`ActivityDefinition-context-type` is `conformance-context-type`):
                // then the component's code after the type names it.
                let kind = match kinds.get(definition) {
                    Some(kind) => kind.to_string(),
                    None => format!("?{}", definition.rsplit('/').next().unwrap_or_default()),
                };
                let expression = component["expression"].as_str().unwrap_or_default();
                parts.push((kind, expression.to_string()));
            }
            // R4's DocumentReference-relationship names each component by the other's
            // definition (`relatesto`, a reference, for `code`; `relation`, a token, for
            // `target`), so neither could ever match; R5 pairs them right. The kinds follow
            // the expressions: the value is `code$target` (docs/search.md).
            if code == "relationship"
                && resource["base"][0] == "DocumentReference"
                && parts.len() == 2
            {
                let (first, second) = (parts[0].0.clone(), parts[1].0.clone());
                parts[0].0 = second;
                parts[1].0 = first;
            }
            for base in resource["base"].as_array().into_iter().flatten() {
                if let Some(base) = base.as_str() {
                    targets.insert((base.to_string(), code.to_string()), to.clone());
                    components.insert((base.to_string(), code.to_string()), parts.clone());
                    params.insert(
                        (base.to_string(), code.to_string()),
                        (kind.to_string(), expression.to_string()),
                    );
                }
            }
        }
        Ok(SearchModel {
            compartment,
            params,
            targets,
            components,
        })
    }

    /// The parts of an expression that apply to `base` (`Observation.subject` out of
    /// `Observation.subject | Condition.subject`), as element paths without the type, or `None`
    /// if a part is more than a plain path (a `where` other than `resolve() is Patient`, an
    /// `as`, a function).
    fn plain_paths(base: &str, expression: &str) -> Option<Vec<String>> {
        let mut paths = Vec::new();
        for part in expression.split('|').map(str::trim) {
            let Some(rest) = part.strip_prefix(base).and_then(|r| r.strip_prefix('.')) else {
                continue;
            };
            // The compartment only follows references to Patients anyway.
            let rest = rest.replace(".where(resolve() is Patient)", "");
            if !rest
                .split('.')
                .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()))
            {
                return None;
            }
            paths.push(rest);
        }
        Some(paths)
    }

    /// The parts of a union expression (split on `|` outside parentheses) that apply to
    /// `base`: `Observation.subject` out of `Observation.subject | Condition.subject`,
    /// `(Observation.value as Quantity)` out of its union. Common parameters (`Resource.id`)
    /// are kept whole.
    fn expression_for(base: &str, expression: &str) -> String {
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        let mut quoted = false;
        for (i, c) in expression.char_indices() {
            match c {
                '\'' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => depth -= 1,
                '|' if !quoted && depth == 0 => {
                    parts.push(expression[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(expression[start..].trim());
        let mine: Vec<&str> = parts
            .into_iter()
            .filter(|part| {
                let bare = part.trim_start_matches('(');
                bare == base
                    || bare.starts_with(&format!("{base}."))
                    || bare.starts_with(&format!("{base} "))
                    || bare.starts_with("Resource.")
                    || bare.starts_with("DomainResource.")
            })
            .collect();
        mine.join(" | ")
    }

    fn render(&self, model: &Model) -> Result<String> {
        let mut out = String::new();
        writeln!(out)?;
        writeln!(out, "/// The Patient compartment (CompartmentDefinition `patient`): each member type with the")?;
        writeln!(out, "/// element paths (from the resource root) whose Patient references put a resource in a")?;
        writeln!(
            out,
            "/// patient's compartment. `Patient` itself is in its own compartment by id too."
        )?;
        writeln!(
            out,
            "pub static PATIENT_COMPARTMENT: &[(&str, &[&str])] = &["
        )?;
        for (base, codes) in &self.compartment {
            let mut paths = BTreeSet::new();
            for code in codes {
                // `{def}` is the CompartmentDefinition's "the resource itself" (Patient).
                if code == "{def}" {
                    continue;
                }
                let Some((_, expression)) = self.params.get(&(base.clone(), code.clone())) else {
                    bail!("compartment parameter {base}.{code} has no SearchParameter");
                };
                let Some(found) = Self::plain_paths(base, expression) else {
                    bail!(
                        "compartment parameter {base}.{code}: {expression:?} is not a plain path"
                    );
                };
                for path in found {
                    let leaf = model.resolve(base, &path)?;
                    if leaf != "Reference" {
                        bail!("compartment parameter {base}.{code}: {path} is a {leaf}, not a Reference");
                    }
                    paths.insert(path);
                }
            }
            let paths: Vec<String> = paths.into_iter().collect();
            writeln!(out, "    ({base:?}, &[{}]),", quoted_list(&paths))?;
        }
        writeln!(out, "];")?;
        writeln!(out)?;
        writeln!(
            out,
            "/// The Patient compartment's search parameters per member type, as the"
        )?;
        writeln!(out, "/// CompartmentDefinition names them (`{{def}}`: the Patient itself): what a compartment")?;
        writeln!(out, "/// search (`GET /Patient/[id]/[type]`) ORs.")?;
        writeln!(
            out,
            "pub static PATIENT_COMPARTMENT_PARAMS: &[(&str, &[&str])] = &["
        )?;
        for (base, codes) in &self.compartment {
            writeln!(out, "    ({base:?}, &[{}]),", quoted_list(codes))?;
        }
        writeln!(out, "];")?;
        writeln!(out)?;
        writeln!(out, "/// Token search parameters whose expression is a plain element path to a code, Coding,")?;
        writeln!(
            out,
            "/// CodeableConcept or Identifier: (type, code, [(path, element type)]), sorted."
        )?;
        writeln!(out, "pub static TOKEN_PARAMS: &[TokenParam] = &[")?;
        let resources: BTreeSet<&str> = model.resource_types().into_iter().collect();
        for ((base, code), (kind, expression)) in &self.params {
            if kind != "token" || !resources.contains(base.as_str()) {
                continue;
            }
            let Some(paths) = Self::plain_paths(base, expression) else {
                continue;
            };
            let mut typed = Vec::new();
            for path in &paths {
                let Ok(leaf) = model.resolve(base, path) else {
                    typed.clear();
                    break;
                };
                match leaf.as_str() {
                    "code" | "Coding" | "CodeableConcept" | "Identifier" => {
                        typed.push(format!("({path:?}, {leaf:?})"))
                    }
                    _ => {
                        typed.clear();
                        break;
                    }
                }
            }
            if !typed.is_empty() {
                writeln!(out, "    ({base:?}, {code:?}, &[{}]),", typed.join(", "))?;
            }
        }
        writeln!(out, "];")?;
        writeln!(out)?;
        writeln!(out, "/// Every R4 SearchParameter, once per base type (`Resource` for the common ones), with")?;
        writeln!(out, "/// its expression cut to that base and its reference targets, sorted by (base, code).")?;
        writeln!(out, "pub static SEARCH_PARAMS: &[SearchParam] = &[")?;
        for ((base, code), (kind, expression)) in &self.params {
            if !resources.contains(base.as_str()) && base != "Resource" && base != "DomainResource"
            {
                continue;
            }
            let expression = Self::expression_for(base, expression);
            let targets = self
                .targets
                .get(&(base.clone(), code.clone()))
                .map(|t| quoted_list(t))
                .unwrap_or_default();
            let components: Vec<String> = self
                .components
                .get(&(base.clone(), code.clone()))
                .into_iter()
                .flatten()
                .map(|(kind, expression)| {
                    let kind = match kind.strip_prefix('?') {
                        None => kind.clone(),
                        Some(id) => {
                            // `ActivityDefinition-context-type`, `conformance-context-type`:
                            // the code is what follows a prefix.
                            let found =
                                id.match_indices('-').map(|(at, _)| &id[at + 1..]).find_map(
                                    |code| self.params.get(&(base.clone(), code.to_string())),
                                );
                            match found {
                                Some((kind, _)) => kind.clone(),
                                None => bail!("composite {base}.{code}: no parameter {id}"),
                            }
                        }
                    };
                    Ok(format!("({kind:?}, {expression:?})"))
                })
                .collect::<Result<_>>()?;
            writeln!(
                out,
                "    SearchParam {{ base: {base:?}, code: {code:?}, kind: {kind:?}, expression: {expression:?}, targets: &[{targets}], components: &[{}] }},",
                components.join(", ")
            )?;
        }
        writeln!(out, "];")?;
        Ok(out)
    }
}

impl Model {
    /// The FHIR type of an element path below a resource type (`Observation`,
    /// `category.coding` -> `Coding`), following backbone elements, datatypes and
    /// contentReferences.
    fn resolve(&self, root: &str, path: &str) -> Result<String> {
        let mut context = root.to_string();
        let mut leaf = root.to_string();
        for segment in path.split('.') {
            let mut full = format!("{context}.{segment}");
            if let Some(target) = self.defined_elsewhere.get(&full) {
                full = target.clone();
            }
            let Some(entry) = self.path_to_type.get(&full) else {
                bail!("{root}.{path}: no element {full}");
            };
            leaf = match entry {
                Value::String(name) if name == "BackboneElement" || name == "Element" => {
                    context = full.clone();
                    name.clone()
                }
                Value::String(name) => {
                    context = name.clone();
                    name.clone()
                }
                Value::Object(object) => {
                    let code = object
                        .get("code")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    context = code.to_string();
                    code.to_string()
                }
                _ => bail!("{full}: unexpected path2Type entry"),
            };
        }
        Ok(leaf)
    }
}
