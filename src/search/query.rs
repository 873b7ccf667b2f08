//! A search's query string read into criteria: `name[:modifier]=value[,value]`, each
//! repetition of a parameter ANDed, its comma-separated values ORed, with FHIR's escapes
//! (`\,` `\|` `\$` `\\`) kept until a value is split on its own separators.

/// One occurrence of a parameter in the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Criterion {
    pub name: String,
    pub modifier: Option<String>,
    /// The alternatives (ORed), still escaped: split further with [`split_escaped`].
    pub values: Vec<String>,
    /// A chain's rest (`name` of `subject:Patient.name`, `organization.name` of a longer
    /// one): the parameter of the referenced resource the values are for.
    pub chain: Option<String>,
}

impl Criterion {
    /// Reads `name[:modifier]` and its value as the query gave them (already URL-decoded).
    pub fn parse(key: &str, value: &str) -> Criterion {
        let (key, chain) = match key.split_once('.') {
            Some((key, rest)) => (key, Some(rest.to_string())),
            None => (key, None),
        };
        let (name, modifier) = match key.split_once(':') {
            Some((name, modifier)) => (name, Some(modifier.to_string())),
            None => (key, None),
        };
        Criterion {
            name: name.to_string(),
            modifier,
            values: split_escaped(value, ',')
                .into_iter()
                .map(str::to_string)
                .collect(),
            chain,
        }
    }
}

/// Splits `text` on `separator` where it is not escaped by a backslash; the parts keep their
/// escapes.
pub fn split_escaped(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == separator => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// A value without its escapes: `\,` is `,`, `\\` is `\`.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commas_or_unless_escaped() {
        let c = Criterion::parse("family:exact", r"a\,b,c");
        assert_eq!(c.name, "family");
        assert_eq!(c.modifier.as_deref(), Some("exact"));
        assert_eq!(c.values, [r"a\,b", "c"]);
        assert_eq!(unescape(&c.values[0]), "a,b");
    }

    #[test]
    fn a_chain_keeps_its_rest() {
        let c = Criterion::parse("subject:Patient.organization.name", "Acme");
        assert_eq!(
            (c.name.as_str(), c.modifier.as_deref(), c.chain.as_deref()),
            ("subject", Some("Patient"), Some("organization.name"))
        );
    }

    #[test]
    fn pipes_split_tokens_unless_escaped() {
        assert_eq!(split_escaped(r"http://x|a\|b", '|'), ["http://x", r"a\|b"]);
        assert_eq!(split_escaped("|code", '|'), ["", "code"]);
        assert_eq!(unescape(r"a\\b\$c"), r"a\b$c");
    }
}
