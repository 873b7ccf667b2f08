//! A condition on a table's rows built outside `store` (FHIR search compiles one), with the
//! values it compares kept apart from its text. Where the values go depends on the statement
//! that runs it: bind parameters in a query, a temporary table's rows in an export's COPY
//! (which takes no parameters); [`Condition::render`] puts each in its place.

/// Marks where value `i` goes in the text: a control character that SQL built from the R4
/// definitions never contains.
const MARK: char = '\u{1}';

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Condition {
    /// The SQL, with a [`Condition::placeholder`] for each value.
    pub sql: String,
    /// The values, all text (the SQL casts them).
    pub binds: Vec<String>,
}

impl Condition {
    /// Where value `i` goes, as written into [`Condition::sql`].
    pub fn placeholder(i: usize) -> String {
        format!("{MARK}{i}{MARK}")
    }

    /// The SQL with each value's place filled by `place(i)` (SQL that yields the text).
    pub fn render(&self, place: impl Fn(usize) -> String) -> String {
        let mut out = String::with_capacity(self.sql.len());
        let mut parts = self.sql.split(MARK);
        out.push_str(parts.next().unwrap_or_default());
        while let (Some(index), Some(rest)) = (parts.next(), parts.next()) {
            if let Ok(i) = index.parse::<usize>() {
                out.push_str(&place(i));
            }
            out.push_str(rest);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_goes_where_the_statement_says() {
        let condition = Condition {
            sql: format!(
                "a = {} AND b = {}",
                Condition::placeholder(0),
                Condition::placeholder(1)
            ),
            binds: vec!["x".into(), "y".into()],
        };
        assert_eq!(
            condition.render(|i| format!("${}", i + 6)),
            "a = $6 AND b = $7"
        );
    }
}
