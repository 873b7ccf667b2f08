//! `_cursor`: where the next page starts, written into `next` links. Ordered by id alone, it
//! is the last id; with `_sort`, the last row's keys and id as a JSON array in base64url.
//! It holds only what the previous page showed, and is read back as bound values.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::Value;

use super::SearchError;
use crate::store::search::After;

/// The cursor for a page that starts after a row with these keys and id.
pub fn write(keys: &[Option<String>], id: &str) -> String {
    if keys.is_empty() {
        return id.to_string();
    }
    let mut items: Vec<Value> = keys.iter().map(|k| Value::from(k.clone())).collect();
    items.push(Value::from(id));
    URL_SAFE_NO_PAD.encode(Value::Array(items).to_string())
}

/// Reads a cursor of a search with `keys` sort keys.
pub fn read(text: &str, keys: usize) -> Result<After, SearchError> {
    if keys == 0 {
        return Ok(After {
            keys: Vec::new(),
            id: text.to_string(),
        });
    }
    let invalid = || {
        SearchError::invalid(
            "_cursor",
            "not a cursor of this search: follow the next link as it is",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(invalid());
    };
    if items.len() != keys + 1 {
        return Err(invalid());
    }
    let mut texts = Vec::with_capacity(items.len());
    for item in items {
        texts.push(match item {
            Value::Null => None,
            Value::String(s) => Some(s),
            _ => return Err(invalid()),
        });
    }
    let id = texts.pop().flatten().ok_or_else(invalid)?;
    Ok(After { keys: texts, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_as_written() {
        let keys = vec![Some("2020-01-01T00:00:00.000000Z".to_string()), None];
        let text = write(&keys, "p-1");
        assert_eq!(
            read(&text, 2),
            Ok(After {
                keys,
                id: "p-1".into()
            })
        );
        assert_eq!(write(&[], "p-1"), "p-1");
        assert!(read(&text, 1).is_err());
        assert!(read("not base64!", 1).is_err());
    }
}
