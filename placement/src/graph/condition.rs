//! Switch conditions: the useful subset of GJSON (the path language KServe's InferenceGraph router
//! evaluates `condition` with), parsed once at registration and evaluated against the V2 JSON view of a
//! request.
//!
//! KServe runs a Switch step when `gjson.Get(request, condition).Exists()`. The view a condition reads
//! here is the request as V2 JSON, plus its headers:
//!
//! ```json
//! {"id": "...", "parameters": {"tier": "gold"}, "headers": {"x-user": "u1"},
//!  "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [0.7]}]}
//! ```
//!
//! Supported (anything else is refused at registration, naming the condition):
//! - a path of keys and array indexes: `parameters.tier`, `headers.x-user`, `inputs.0.data.0`;
//! - array queries `#(path op value)`, which pick the first element that matches, and `#(path)`, the
//!   first element that has `path`: `inputs.#(name=="x").data.#(>0.5)`;
//! - `[@this]` first, which wraps the whole request in an array so a query can test it:
//!   `[@this].#(parameters.tier=="gold")` (the form KServe's own examples use);
//! - operators `==`, `!=`, `<`, `<=`, `>`, `>=`; values are numbers, `"strings"`, `true`, `false`, or
//!   bare words (compared as strings, as GJSON does).
//!
//! Not supported: wildcards, `#` counts and `#(...)#` (all matches), modifiers other than `@this`,
//! pipes, multipaths, `%` patterns and nested queries.

use serde_json::Value;

/// The top-level fields of the view; a condition naming any other can never hold.
pub const VIEW_FIELDS: [&str; 4] = ["id", "parameters", "headers", "inputs"];

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// Wraps the view in a one-element array first (`[@this]`).
    this: bool,
    path: Vec<Component>,
}

#[derive(Debug, Clone, PartialEq)]
enum Component {
    /// An object member, or an array index when it is all digits.
    Key(String),
    /// The first array element for which `path` exists (and, with a comparison, compares true).
    Query { path: Vec<String>, compare: Option<(Op, Literal)> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Number(f64),
    String(String),
    Bool(bool),
}

/// Why a condition is not in the supported subset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("condition {condition:?} is not supported: {why} (see the supported GJSON subset in the docs)")]
pub struct UnsupportedCondition {
    pub condition: String,
    pub why: String,
}

impl Condition {
    /// Parses `text`, refusing anything outside the subset.
    pub fn parse(text: &str) -> Result<Self, UnsupportedCondition> {
        let refuse = |why: &str| UnsupportedCondition { condition: text.to_owned(), why: why.to_owned() };
        let (this, rest) = match text.strip_prefix("[@this]") {
            Some("") => return Err(refuse("[@this] alone always exists; add a query such as .#(a==1)")),
            Some(rest) => (true, rest.strip_prefix('.').ok_or_else(|| refuse("expected '.' after [@this]"))?),
            None => (false, text),
        };
        let mut path = Vec::new();
        for part in split_top_level(rest).map_err(|why| refuse(&why))? {
            path.push(component(part).map_err(|why| refuse(&why))?);
        }
        let first_key = match (this, path.first()) {
            (false, Some(Component::Key(key))) => Some(key.as_str()),
            (false, _) => return Err(refuse("a condition starts with a field of the request")),
            (true, Some(Component::Query { path, .. })) => path.first().map(String::as_str),
            (true, _) => return Err(refuse("[@this] must be followed by a query, as in [@this].#(a==1)")),
        };
        if !first_key.is_some_and(|key| VIEW_FIELDS.contains(&key)) {
            return Err(refuse(&format!("it must start with one of {}", VIEW_FIELDS.join(", "))));
        }
        Ok(Self { this, path })
    }

    /// Whether the condition holds for `view` (GJSON's `Exists()` of the path).
    pub fn holds(&self, view: &Value) -> bool {
        let wrapped;
        let mut at = if self.this {
            wrapped = Value::Array(vec![view.clone()]);
            &wrapped
        } else {
            view
        };
        for component in &self.path {
            let next = match component {
                Component::Key(key) => member(at, key),
                Component::Query { path, compare } => at
                    .as_array()
                    .and_then(|items| items.iter().find(|item| matches(item, path, compare.as_ref()))),
            };
            match next {
                Some(value) => at = value,
                None => return false,
            }
        }
        true
    }
}

/// `key` of an object, or element `key` of an array when `key` is an index.
fn member<'v>(value: &'v Value, key: &str) -> Option<&'v Value> {
    match value {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    }
}

fn matches(item: &Value, path: &[String], compare: Option<&(Op, Literal)>) -> bool {
    let mut at = item;
    for key in path {
        match member(at, key) {
            Some(value) => at = value,
            None => return false,
        }
    }
    let Some((op, literal)) = compare else { return true };
    let ordering = match (at, literal) {
        (Value::Number(n), Literal::Number(want)) => n.as_f64().and_then(|got| got.partial_cmp(want)),
        (Value::String(got), Literal::String(want)) => Some(got.as_str().cmp(want.as_str())),
        (Value::Bool(got), Literal::Bool(want)) => {
            return match op {
                Op::Eq => got == want,
                Op::Ne => got != want,
                _ => false,
            };
        }
        _ => None,
    };
    let Some(ordering) = ordering else { return false };
    use std::cmp::Ordering::*;
    match op {
        Op::Eq => ordering == Equal,
        Op::Ne => ordering != Equal,
        Op::Lt => ordering == Less,
        Op::Le => ordering != Greater,
        Op::Gt => ordering == Greater,
        Op::Ge => ordering != Less,
    }
}

/// Splits a path on the dots that are outside `#(...)` and quotes.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let (mut parts, mut depth, mut quoted, mut start) = (Vec::new(), 0usize, false, 0);
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if quoted => {
                chars.next();
            }
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.checked_sub(1).ok_or("a ')' has no '('")?,
            '.' if !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted || depth != 0 {
        return Err("a quote or a '(' is not closed".to_owned());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn component(part: &str) -> Result<Component, String> {
    if let Some(query) = part.strip_prefix("#(") {
        let Some(query) = query.strip_suffix(')') else {
            return Err(format!("{part:?}: '#(...)#' (every match) is not supported, only '#(...)'"));
        };
        return parse_query(query);
    }
    plain_key(part).map(|key| Component::Key(key.to_owned()))
}

fn plain_key(key: &str) -> Result<&str, String> {
    if key.is_empty() {
        return Err("an empty path segment (two dots, or a dot at an end)".to_owned());
    }
    if let Some(c) = key.chars().find(|c| "*?#@|,[]{}()!=<>%\"\\ ".contains(*c)) {
        return Err(format!(
            "{key:?}: the character {c:?} (wildcards, counts, modifiers, pipes) is not supported"
        ));
    }
    Ok(key)
}

fn parse_query(query: &str) -> Result<Component, String> {
    // The operator is the first one outside quotes; two-character ones win over their prefixes.
    let at = find_operator(query);
    let (path_text, compare) = match at {
        None => (query, None),
        Some((i, op, len)) => {
            let value = query[i + len..].trim();
            (query[..i].trim(), Some((op, literal(value)?)))
        }
    };
    let mut path = Vec::new();
    if !path_text.is_empty() {
        for key in path_text.split('.') {
            if key.starts_with("#(") {
                return Err(format!("{query:?}: nested queries are not supported"));
            }
            path.push(plain_key(key)?.to_owned());
        }
    } else if compare.is_none() {
        return Err("an empty query '#()'".to_owned());
    }
    Ok(Component::Query { path, compare })
}

fn find_operator(query: &str) -> Option<(usize, Op, usize)> {
    let bytes = query.as_bytes();
    let mut quoted = false;
    for (i, &byte) in bytes.iter().enumerate() {
        match byte {
            b'"' => quoted = !quoted,
            _ if quoted => {}
            b'=' | b'!' | b'<' | b'>' => {
                let two = bytes.get(i + 1) == Some(&b'=');
                let op = match (byte, two) {
                    (b'=', true) => Op::Eq,
                    (b'!', true) => Op::Ne,
                    (b'<', true) => Op::Le,
                    (b'>', true) => Op::Ge,
                    (b'<', false) => Op::Lt,
                    (b'>', false) => Op::Gt,
                    // `=` alone and `!` alone (GJSON's `!%`) are not in the subset: refused by the key.
                    _ => continue,
                };
                return Some((i, op, if two { 2 } else { 1 }));
            }
            _ => {}
        }
    }
    None
}

fn literal(value: &str) -> Result<Literal, String> {
    if value.is_empty() {
        return Err("a comparison without a value".to_owned());
    }
    if let Some(quoted) = value.strip_prefix('"') {
        let Some(inner) = quoted.strip_suffix('"') else {
            return Err(format!("{value:?}: the string is not closed"));
        };
        return serde_json::from_str::<String>(&format!("\"{inner}\""))
            .map(Literal::String)
            .map_err(|e| format!("{value:?}: not a JSON string: {e}"));
    }
    match value {
        "true" => return Ok(Literal::Bool(true)),
        "false" => return Ok(Literal::Bool(false)),
        _ => {}
    }
    if let Ok(number) = value.parse::<f64>() {
        return Ok(Literal::Number(number));
    }
    if value.chars().any(|c| "()\"\\=<>!%*?".contains(c) || c.is_whitespace()) {
        return Err(format!("{value:?}: not a number, a quoted string, true, false or a bare word"));
    }
    Ok(Literal::String(value.to_owned()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn view() -> Value {
        json!({
            "id": "r1",
            "parameters": {"tier": "gold", "limit": 3, "beta": true},
            "headers": {"x-user": "u1"},
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1], "data": [0.7]},
                {"name": "y", "datatype": "INT64", "shape": [2], "data": [4, 9]}
            ]
        })
    }

    #[test]
    fn supported_conditions_evaluate_as_gjson_exists() {
        let cases = [
            ("parameters.tier", true),
            ("parameters.missing", false),
            ("headers.x-user", true),
            ("inputs.1.data.1", true),
            ("inputs.1.data.2", false),
            (r#"inputs.#(name=="x")"#, true),
            (r#"inputs.#(name=="z")"#, false),
            (r#"inputs.#(name=="x").data.#(>0.5)"#, true),
            (r#"inputs.#(name=="x").data.#(>0.8)"#, false),
            (r#"inputs.#(name=="y").data.#(>=9)"#, true),
            (r#"inputs.#(name=="y").data.#(<4)"#, false),
            (r#"inputs.#(name!="x").name"#, true),
            ("inputs.#(shape)", true),
            (r#"[@this].#(parameters.tier=="gold")"#, true),
            ("[@this].#(parameters.tier==gold)", true),
            ("[@this].#(parameters.tier==silver)", false),
            ("[@this].#(parameters.limit<=3)", true),
            ("[@this].#(parameters.limit<3)", false),
            ("[@this].#(parameters.beta==true)", true),
            ("[@this].#(parameters.beta!=true)", false),
            (r#"[@this].#(headers.x-user=="u1")"#, true),
            // A number never equals a string, as in GJSON.
            (r#"[@this].#(parameters.limit=="3")"#, false),
        ];
        for (text, expected) in cases {
            let condition = Condition::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(condition.holds(&view()), expected, "{text}");
        }
    }

    #[test]
    fn conditions_outside_the_subset_are_refused_naming_them() {
        for text in [
            "",
            "instances.#(intent==\"Open\")",
            "inputs.#",
            "inputs.#.name",
            "inputs.*.name",
            "inputs.#(name==\"x\")#",
            "inputs.#(data.#(>1))",
            "parameters.tier|@reverse",
            "@this",
            "[@this]",
            "[@this].parameters",
            "parameters..tier",
            "inputs.#(name=\"x\")",
            "inputs.#(name%\"x*\")",
            "inputs.#(name==\"x)",
            "inputs.#(name==)",
        ] {
            let err = Condition::parse(text).expect_err(text);
            assert_eq!(err.condition, text);
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }
}
