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
    members_by(text, out, end_of_value)
}

/// [`members`], finding where each value ends with `end_of_value`.
fn members_by<'a>(
    text: &'a [u8],
    out: &mut Vec<Member<'a>>,
    end_of_value: impl Fn(&[u8], usize) -> Option<usize>,
) -> Option<()> {
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
    items_by(text, out, end_of_value)
}

/// [`items`], finding where each item ends with `end_of_value`.
fn items_by<'a>(
    text: &'a [u8],
    out: &mut Vec<&'a [u8]>,
    end_of_value: impl Fn(&[u8], usize) -> Option<usize>,
) -> Option<()> {
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

/// Where every object and array of one document ends, found in one pass: the members and
/// items of nested values are then found without scanning each value again at every depth
/// above it (a value at depth d was scanned d times; the scans were 38% of the bulk exports'
/// conversion, profiled). Works on the document it indexed and slices of it; other text is
/// scanned as [`members`] and [`items`] do.
#[derive(Debug, Default)]
pub struct Ends {
    /// The address of the document's first byte, and its length.
    start: usize,
    len: usize,
    /// At the offset of each `{` or `[`: the offset just past its match; 0 elsewhere.
    close: Vec<u32>,
    open: Vec<u32>,
}

impl Ends {
    /// Indexes `doc` (forgetting the one before). Unbalanced or too large text is left
    /// unindexed (then every lookup scans).
    pub fn index(&mut self, doc: &[u8]) {
        self.start = doc.as_ptr() as usize;
        self.len = 0;
        self.close.clear();
        self.open.clear();
        if doc.len() >= u32::MAX as usize {
            return;
        }
        self.close.resize(doc.len(), 0);
        let mut j = 0;
        while j < doc.len() {
            match CLASS[doc[j] as usize] {
                QUOTE => match end_of_string(doc, j) {
                    Some(end) => {
                        j = end;
                        continue;
                    }
                    None => return,
                },
                OPEN => self.open.push(j as u32),
                CLOSE => match self.open.pop() {
                    Some(open) => self.close[open as usize] = j as u32 + 1,
                    None => return,
                },
                _ => {}
            }
            j += 1;
        }
        if self.open.is_empty() {
            self.len = doc.len();
        }
    }

    /// [`end_of_value`], looked up when `text` lies within the indexed document.
    pub fn end_of_value(&self, text: &[u8], i: usize) -> Option<usize> {
        let offset = (text.as_ptr() as usize).wrapping_sub(self.start);
        let inside = offset <= self.len && text.len() <= self.len - offset;
        if inside && matches!(text.get(i), Some(b'{' | b'[')) {
            let end = self.close[offset + i] as usize;
            if end > offset + i && end - offset <= text.len() {
                return Some(end - offset);
            }
        }
        end_of_value(text, i)
    }

    /// [`members`] of a part of the indexed document.
    pub fn members<'a>(&self, text: &'a [u8], out: &mut Vec<Member<'a>>) -> Option<()> {
        members_by(text, out, |t, i| self.end_of_value(t, i))
    }

    /// [`items`] of a part of the indexed document.
    pub fn items<'a>(&self, text: &'a [u8], out: &mut Vec<&'a [u8]>) -> Option<()> {
        items_by(text, out, |t, i| self.end_of_value(t, i))
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
    fn an_indexed_document_answers_as_a_scan_does() {
        let doc = br#" {"a": "x\"}", "bb": [1, {"c": "]["}], "d": {"e": [[], {}]}} "#;
        let mut ends = Ends::default();
        ends.index(doc);
        let (mut scanned, mut looked_up) = (Vec::new(), Vec::new());
        members(doc, &mut scanned).expect("an object");
        ends.members(doc, &mut looked_up).expect("an object");
        assert_eq!(
            scanned.iter().map(|m| m.member).collect::<Vec<_>>(),
            looked_up.iter().map(|m| m.member).collect::<Vec<_>>()
        );
        // Slices of it, and text that is not part of it.
        let nested = looked_up[2].value;
        ends.members(nested, &mut looked_up).expect("an object");
        assert_eq!(looked_up[0].value, b"[[], {}]");
        let mut list = Vec::new();
        ends.items(b"[{\"z\": [1]}, 2]", &mut list)
            .expect("an array");
        assert_eq!(list, [&b"{\"z\": [1]}"[..], b"2"]);
        // Unbalanced text is not indexed, and still scanned right.
        ends.index(b"{\"a\": [1}");
        assert!(ends.members(b"{\"a\": [1}", &mut looked_up).is_none());
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
