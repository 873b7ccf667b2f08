//! Borrowed scanning of JSON text: find the members of an object, the items of an array and
//! where a value ends, without building a tree. The bulk paths splice and rewrite JSON with
//! these at a few hundred MB/s per core, where parsing into `serde_json::Value` and printing
//! it again runs at about a hundred.
//!
//! The scanner trusts that its input is JSON (it comes from PostgreSQL's jsonb or has been
//! validated); on malformed input it returns `None`, never panics.

/// A member of an object: the key's text between its quotes (still escaped), the whole
/// member (`"key": value`) and the value alone.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    pub key: &'a [u8],
    pub member: &'a [u8],
    pub value: &'a [u8],
}

/// The members of the object `text` (which may have surrounding whitespace), appended to
/// `out` (cleared first). `None` if `text` is not an object.
pub fn members<'a>(text: &'a [u8], out: &mut Vec<Member<'a>>) -> Option<()> {
    out.clear();
    let mut i = skip_whitespace(text, 0);
    if text.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_whitespace(text, i + 1);
    if text.get(i) == Some(&b'}') {
        return Some(());
    }
    loop {
        let key_start = i;
        let key_end = end_of_string(text, i)?;
        i = skip_whitespace(text, key_end);
        if text.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_whitespace(text, i + 1);
        let value_end = end_of_value(text, value_start)?;
        out.push(Member {
            key: &text[key_start + 1..key_end - 1],
            member: &text[key_start..value_end],
            value: &text[value_start..value_end],
        });
        i = skip_whitespace(text, value_end);
        match text.get(i) {
            Some(b',') => i = skip_whitespace(text, i + 1),
            Some(b'}') => return Some(()),
            _ => return None,
        }
    }
}

/// The items of the array `text`, appended to `out` (cleared first). `None` if `text` is not
/// an array.
pub fn items<'a>(text: &'a [u8], out: &mut Vec<&'a [u8]>) -> Option<()> {
    out.clear();
    let mut i = skip_whitespace(text, 0);
    if text.get(i) != Some(&b'[') {
        return None;
    }
    i = skip_whitespace(text, i + 1);
    if text.get(i) == Some(&b']') {
        return Some(());
    }
    loop {
        let end = end_of_value(text, i)?;
        out.push(&text[i..end]);
        i = skip_whitespace(text, end);
        match text.get(i) {
            Some(b',') => i = skip_whitespace(text, i + 1),
            Some(b']') => return Some(()),
            _ => return None,
        }
    }
}

/// The first non-whitespace byte of `text`.
pub fn first_byte(text: &[u8]) -> Option<u8> {
    text.get(skip_whitespace(text, 0)).copied()
}

/// The inner text of a JSON string value (between its quotes, still escaped).
pub fn string_inner(value: &[u8]) -> Option<&[u8]> {
    let start = skip_whitespace(value, 0);
    let end = end_of_string(value, start)?;
    Some(&value[start + 1..end - 1])
}

pub fn skip_whitespace(text: &[u8], mut i: usize) -> usize {
    while matches!(text.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// The index just past the string starting at `i` (which must be a `"`).
pub fn end_of_string(text: &[u8], i: usize) -> Option<usize> {
    if text.get(i) != Some(&b'"') {
        return None;
    }
    let mut j = i + 1;
    // Jump from one quote or backslash to the next (SIMD in memchr): most of a resource's
    // bytes are inside strings, and this is the text path's hottest loop. (Looking at the
    // first bytes one by one before that was slower, measured.)
    loop {
        j += memchr::memchr2(b'"', b'\\', text.get(j..)?)?;
        match text[j] {
            b'"' => return Some(j + 1),
            _ => j += 2,
        }
    }
}

/// What a byte means to the scan of a container, outside strings.
const OTHER: u8 = 0;
const QUOTE: u8 = 1;
const OPEN: u8 = 2;
const CLOSE: u8 = 3;

static CLASS: [u8; 256] = {
    let mut class = [OTHER; 256];
    class[b'"' as usize] = QUOTE;
    class[b'{' as usize] = OPEN;
    class[b'[' as usize] = OPEN;
    class[b'}' as usize] = CLOSE;
    class[b']' as usize] = CLOSE;
    class
};

/// The index just past the value starting at `i`.
pub fn end_of_value(text: &[u8], i: usize) -> Option<usize> {
    match text.get(i)? {
        b'"' => end_of_string(text, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < text.len() {
                match CLASS[text[j] as usize] {
                    QUOTE => {
                        j = end_of_string(text, j)?;
                        continue;
                    }
                    OPEN => depth += 1,
                    CLOSE => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while let Some(b) = text.get(j) {
                if matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t') {
                    break;
                }
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Appends `text` without the whitespace between tokens (compact JSON).
pub fn write_compact(out: &mut Vec<u8>, text: &[u8]) {
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'"' => {
                let end = end_of_string(text, i).unwrap_or(text.len());
                out.extend_from_slice(&text[i..end]);
                i = end;
            }
            b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            byte => {
                // Copy the run up to the next quote or whitespace in one go.
                let run = text[i..]
                    .iter()
                    .position(|b| matches!(b, b'"' | b' ' | b'\n' | b'\r' | b'\t'))
                    .map_or(text.len(), |p| i + p);
                if run == i {
                    out.push(byte);
                    i += 1;
                } else {
                    out.extend_from_slice(&text[i..run]);
                    i = run;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_items_and_values() {
        let text = br#" {"a": "x\"}", "bb": [1, {"c": "]"}], "ccc": -1.50e3, "d": null, "e": {}} "#;
        let mut found = Vec::new();
        members(text, &mut found).expect("an object");
        let keys: Vec<&[u8]> = found.iter().map(|m| m.key).collect();
        assert_eq!(keys, [&b"a"[..], b"bb", b"ccc", b"d", b"e"]);
        assert_eq!(found[1].value, br#"[1, {"c": "]"}]"#);
        assert_eq!(found[2].member, br#""ccc": -1.50e3"#);
        let mut list = Vec::new();
        items(found[1].value, &mut list).expect("an array");
        assert_eq!(list, [&b"1"[..], br#"{"c": "]"}"#]);
        assert!(members(b"[1, 2]", &mut found).is_none());
        assert!(members(b"{\"a\": ", &mut found).is_none());
        assert!(items(b"[1, ", &mut list).is_none());
        assert_eq!(string_inner(br#" "a\"b" "#), Some(&br#"a\"b"#[..]));
    }

    #[test]
    fn compaction_keeps_strings_intact() {
        let mut out = Vec::new();
        write_compact(
            &mut out,
            br#"{"a b": [1, 2.50, "x , y"], "c": {"d": null}}"#,
        );
        assert_eq!(out, br#"{"a b":[1,2.50,"x , y"],"c":{"d":null}}"#);
    }
}
