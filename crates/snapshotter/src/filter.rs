//! containerd's filter syntax for List, over the fields containerd's own
//! snapshotters expose: `kind` (`active`, `view`, `committed`), `name`,
//! `parent` and `labels.KEY`.
//!
//! A filter is `selector(,selector)*`, all of which must match; a selector
//! is `fieldpath`, `fieldpath==value` or `fieldpath!=value`. Field names
//! and values may be double-quoted (`labels."containerd.io/gc.root"`).
//! Several filters match a snapshot when any of them does. Regular
//! expressions (`~=`) are refused rather than approximated.

use crate::error::Error;
use crate::store::Snapshot;

/// Parsed filters: a snapshot matches if any alternative does.
#[derive(Debug, Default)]
pub struct Filters {
    alternatives: Vec<Vec<Selector>>,
}

#[derive(Debug, PartialEq, Eq)]
struct Selector {
    fieldpath: Vec<String>,
    test: Test,
}

#[derive(Debug, PartialEq, Eq)]
enum Test {
    Present,
    Equal(String),
    NotEqual(String),
}

impl Filters {
    /// Parses containerd's filter strings; empty ones match everything.
    pub fn parse(filters: &[String]) -> Result<Filters, Error> {
        let mut alternatives = Vec::new();
        for filter in filters.iter().filter(|f| !f.is_empty()) {
            alternatives.push(Parser::new(filter).selectors()?);
        }
        Ok(Filters { alternatives })
    }

    pub fn matches(&self, snapshot: &Snapshot) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|all| all.iter().all(|s| s.matches(snapshot)))
    }
}

impl Selector {
    fn matches(&self, snapshot: &Snapshot) -> bool {
        let value = field(snapshot, &self.fieldpath);
        match &self.test {
            Test::Present => value.is_some(),
            // containerd finds a remote snapshot of a bottom layer with
            // `parent==""`: a missing parent is the empty one.
            Test::Equal(expected) if self.fieldpath == ["parent"] => {
                value.unwrap_or("") == expected
            }
            Test::Equal(expected) => value == Some(expected.as_str()),
            // As containerd: an absent field is "" and differs from any other value.
            Test::NotEqual(expected) => value.unwrap_or("") != expected,
        }
    }
}

/// The value of `fieldpath` in `snapshot`, if it has one.
fn field<'a>(snapshot: &'a Snapshot, fieldpath: &[String]) -> Option<&'a str> {
    let record = &snapshot.record;
    match fieldpath {
        [name] if name == "kind" => Some(record.kind.name()),
        [name] if name == "name" => Some(&snapshot.key),
        [name] if name == "parent" => record.parent.as_deref(),
        [labels, key @ ..] if labels == "labels" && !key.is_empty() => {
            record.labels.get(&key.join(".")).map(String::as_str)
        }
        _ => None,
    }
}

struct Parser<'a> {
    input: &'a str,
    position: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, position: 0 }
    }

    fn error(&self, message: impl Into<String>) -> Error {
        Error::Filter {
            filter: self.input.to_owned(),
            position: self.position,
            message: message.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.position..]
    }

    fn skip_spaces(&mut self) {
        let rest = self.rest();
        self.position += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_spaces();
        if self.rest().starts_with(token) {
            self.position += token.len();
            true
        } else {
            false
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, Error> {
        let mut selectors = vec![self.selector()?];
        while self.eat(",") {
            selectors.push(self.selector()?);
        }
        self.skip_spaces();
        if !self.rest().is_empty() {
            return Err(self.error("unexpected input"));
        }
        Ok(selectors)
    }

    fn selector(&mut self) -> Result<Selector, Error> {
        let mut fieldpath = vec![self.field()?];
        while self.eat(".") {
            fieldpath.push(self.field()?);
        }
        let test = if self.eat("==") {
            Test::Equal(self.value()?)
        } else if self.eat("!=") {
            Test::NotEqual(self.value()?)
        } else if self.rest().starts_with("~=") {
            return Err(self.error("regular expressions (~=) are not supported"));
        } else {
            Test::Present
        };
        Ok(Selector { fieldpath, test })
    }

    /// `[A-Za-z][A-Za-z0-9_]*` or a quoted string.
    fn field(&mut self) -> Result<String, Error> {
        self.skip_spaces();
        if self.rest().starts_with('"') {
            return self.quoted();
        }
        let rest = self.rest();
        let len = rest
            .char_indices()
            .find(|&(i, c)| {
                !(c.is_ascii_alphabetic() || (i > 0 && (c.is_ascii_digit() || c == '_')))
            })
            .map_or(rest.len(), |(i, _)| i);
        if len == 0 {
            return Err(self.error("expected a field name"));
        }
        self.position += len;
        Ok(rest[..len].to_owned())
    }

    /// Anything up to a space or comma, or a quoted string.
    fn value(&mut self) -> Result<String, Error> {
        self.skip_spaces();
        if self.rest().starts_with('"') {
            return self.quoted();
        }
        let rest = self.rest();
        let len = rest
            .find(|c: char| c == ',' || c.is_whitespace())
            .unwrap_or(rest.len());
        if len == 0 {
            return Err(self.error("expected a value"));
        }
        self.position += len;
        Ok(rest[..len].to_owned())
    }

    /// `"..."` with `\"`, `\\`, `\n`, `\t` escapes.
    fn quoted(&mut self) -> Result<String, Error> {
        let start = self.position;
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.position += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, '"')) => out.push('"'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    _ => {
                        self.position = start + i;
                        return Err(self.error("unsupported escape in a quoted string"));
                    }
                },
                c => out.push(c),
            }
        }
        Err(self.error("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::store::{Kind, Labels, Layer, Record};

    fn snapshot(key: &str, kind: Kind, parent: Option<&str>, labels: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            key: key.to_owned(),
            record: Record {
                id: 1,
                kind,
                parent: parent.map(str::to_owned),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<Labels>(),
                created: SystemTime::UNIX_EPOCH,
                updated: SystemTime::UNIX_EPOCH,
                usage: None,
                layer: Layer::Directory,
            },
        }
    }

    #[test]
    fn filters_select_like_containerds() {
        let layer = snapshot(
            "ns/1/sha256:aa",
            Kind::Committed,
            None,
            &[("containerd.io/gc.root", "x"), ("team", "a b")],
        );
        let container = snapshot("ns/2/c1", Kind::Active, Some("ns/1/sha256:aa"), &[]);
        let cases: &[(&[&str], bool, bool)] = &[
            (&[], true, true),
            (&[""], true, true),
            (&["kind==committed"], true, false),
            (&["kind!=committed"], false, true),
            (&["kind==view", "kind==active"], false, true),
            (&["parent"], false, true),
            (&["parent==\"ns/1/sha256:aa\""], false, true),
            (&["parent==\"\""], true, false),
            (&["name==ns/2/c1"], false, true),
            (&["labels.\"containerd.io/gc.root\""], true, false),
            (
                &["labels.\"containerd.io/gc.root\"==x,kind==committed"],
                true,
                false,
            ),
            (
                &["labels.\"containerd.io/gc.root\"==x,kind==active"],
                false,
                false,
            ),
            (&["labels.team==\"a b\""], true, false),
            (&["labels.team!=b"], true, true),
            (&["labels"], false, false),
            (&["size"], false, false),
            (&[" kind == active "], false, true),
        ];
        for (filters, on_layer, on_container) in cases {
            let strings: Vec<String> = filters.iter().map(|s| (*s).to_owned()).collect();
            let parsed = Filters::parse(&strings).unwrap();
            assert_eq!(
                parsed.matches(&layer),
                *on_layer,
                "{filters:?} on the layer"
            );
            assert_eq!(
                parsed.matches(&container),
                *on_container,
                "{filters:?} on the container"
            );
        }
    }

    #[test]
    fn bad_filters_are_refused_with_their_position() {
        let cases = [
            ("kind~=act.*", 4, "regular expressions"),
            ("kind==", 6, "expected a value"),
            ("==x", 0, "expected a field name"),
            ("labels.\"open", 7, "unterminated"),
            ("labels.\"a\\q\"", 9, "unsupported escape"),
            ("kind==a b", 8, "unexpected input"),
            ("kind,", 5, "expected a field name"),
        ];
        for (filter, position, message) in cases {
            let err = Filters::parse(&[filter.to_owned()]).unwrap_err();
            match &err {
                Error::Filter {
                    position: at,
                    message: said,
                    ..
                } => {
                    assert_eq!(*at, position, "{filter}: {err}");
                    assert!(said.contains(message), "{filter}: {err}");
                }
                other => panic!("{filter}: {other}"),
            }
        }
    }
}
