//! Where in a document the converter is, kept as a chain of stack frames so that it costs
//! nothing until an error needs the path (`Observation.component[1].valueFoo`).

#[derive(Clone, Copy)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

#[derive(Clone, Copy)]
pub struct Trail<'a> {
    parent: Option<&'a Trail<'a>>,
    step: Step<'a>,
}

impl<'a> Trail<'a> {
    /// The root, named after the resource type.
    pub fn root(name: &'a str) -> Trail<'a> {
        Trail {
            parent: None,
            step: Step::Key(name),
        }
    }

    pub fn key(&'a self, key: &'a str) -> Trail<'a> {
        Trail {
            parent: Some(self),
            step: Step::Key(key),
        }
    }

    pub fn index(&'a self, index: usize) -> Trail<'a> {
        Trail {
            parent: Some(self),
            step: Step::Index(index),
        }
    }

    /// `Observation.component[1].valueFoo`.
    pub fn render(&self) -> String {
        let mut steps = Vec::new();
        let mut current = Some(self);
        while let Some(trail) = current {
            steps.push(trail.step);
            current = trail.parent;
        }
        let mut out = String::new();
        for step in steps.into_iter().rev() {
            match step {
                Step::Key(key) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(key);
                }
                Step::Index(index) => out.push_str(&format!("[{index}]")),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fhirpath_like() {
        let root = Trail::root("Observation");
        let component = root.key("component");
        let second = component.index(1);
        assert_eq!(
            second.key("valueFoo").render(),
            "Observation.component[1].valueFoo"
        );
    }
}
