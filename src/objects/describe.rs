//! A storage error in words a person can act on: what kind of failure (no such object, access
//! denied, wrong credentials, the server unreachable) and the storage's own message, without
//! the layers of wrapping `object_store` puts around it.

/// What went wrong, in words.
pub fn describe(error: &object_store::Error) -> String {
    use object_store::Error as E;
    let kind = match error {
        E::NotFound { .. } => "no such object (or no such bucket)",
        E::PermissionDenied { .. } => "access denied: the credentials may not do this",
        E::Unauthenticated { .. } => "the credentials were refused (a wrong key or secret?)",
        E::AlreadyExists { .. } => "the object exists already",
        E::Precondition { .. } | E::NotModified { .. } => "a precondition failed",
        E::NotSupported { .. } | E::NotImplemented { .. } => "not supported by this storage",
        E::InvalidPath { .. } => "not a valid object key",
        _ => "the storage request failed",
    };
    format!("{kind} ({})", innermost(error))
}

/// The innermost cause: where the storage's or the network's own words are.
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    let mut words = current.to_string();
    while let Some(source) = current.source() {
        let text = source.to_string();
        if !text.is_empty() {
            words = text;
        }
        current = source;
    }
    // A message may end in the storage's XML error document: keep its Code and Message.
    match (tag(&words, "Code"), tag(&words, "Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => words,
    }
}

fn tag<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find("</")? + start;
    Some(&text[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_storage_words_are_kept() {
        let error = object_store::Error::NotFound {
            path: "b/k".into(),
            source: "<Error><Code>NoSuchBucket</Code><Message>The bucket does not exist</Message></Error>".into(),
        };
        assert_eq!(
            describe(&error),
            "no such object (or no such bucket) (NoSuchBucket: The bucket does not exist)"
        );
    }
}
