//! JSON read while it is being generated: how much of a text is one JSON value so far, and
//! the string literals and keys before it, so that a stream can pass on a value's text as it
//! grows (tool-call arguments, `tool_calls.rs`).

/// How much of `s` (after leading whitespace) is a JSON object or array, and whether it is
/// whole: `(start, end, complete)`, byte offsets into `s`. `None` when `s` starts with something
/// else.
pub fn json_container_prefix(s: &str) -> Option<(usize, usize, bool)> {
    let start = s.len() - s.trim_start().len();
    let body = &s[start..];
    if !(body.starts_with('{') || body.starts_with('[')) {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in body.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some((start, start + i + 1, true));
                }
            }
            _ => {}
        }
    }
    Some((start, s.len(), false))
}

/// A complete JSON string literal at the start of `s` (after whitespace): its value and the
/// rest.
pub fn string_literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    let body = s.strip_prefix('"')?;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match (escaped, c) {
            (true, _) => escaped = false,
            (false, '\\') => escaped = true,
            (false, '"') => {
                let literal = &s[..i + 2];
                let value = serde_json::from_str(literal).ok()?;
                return Some((value, &body[i + 1..]));
            }
            _ => {}
        }
    }
    None
}

/// `"key":` at the start of `s` (after whitespace); the rest.
pub fn key<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let (k, rest) = string_literal(s)?;
    (k == name).then_some(())?;
    rest.trim_start().strip_prefix(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_prefixes_follow_strings_and_nesting() {
        assert_eq!(json_container_prefix(r#" {"a": "}"#), Some((1, 9, false)));
        assert_eq!(
            json_container_prefix(r#"{"a": "}\"", "b": [1, {}]}, tail"#),
            Some((0, 26, true))
        );
        assert_eq!(json_container_prefix("  "), None);
        assert_eq!(json_container_prefix("3"), None);
    }
}
