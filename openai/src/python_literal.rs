//! Python literals as JSON values, the part of `ast.literal_eval` a model's tool-call value
//! can hold: `None`, `True`, `False`, numbers, quoted strings (either quote, with escapes),
//! lists, tuples and dicts of those. vLLM's GLM-4.5 parser tries them after JSON, so
//! `['a', True]` is the list `["a", true]`. Anything else (sets, calls, names, `nan`) is not
//! a value here: `None`, and the caller keeps the text.

use serde_json::{Map, Number, Value};

/// Nesting deeper than this is refused (a value is a few hundred bytes at most; the bound
/// keeps the recursion's stack small whatever the model writes).
const MAX_DEPTH: usize = 64;

/// `text` read as one Python literal (surrounding whitespace allowed).
pub fn parse(text: &str) -> Option<Value> {
    let mut reader = Reader {
        text: text.as_bytes(),
        at: 0,
    };
    let value = reader.value(0)?;
    reader.skip_space();
    (reader.at == reader.text.len()).then_some(value)
}

struct Reader<'a> {
    text: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_space();
        match self.peek()? {
            b'[' => self.sequence(b']', depth).map(Value::Array),
            b'(' => self.sequence(b')', depth).map(Value::Array),
            b'{' => self.dict(depth),
            b'\'' | b'"' => self.string().map(Value::String),
            _ => self.word(),
        }
    }

    /// Items up to `close`, a trailing comma allowed (`(1,)` is a tuple).
    fn sequence(&mut self, close: u8, depth: usize) -> Option<Vec<Value>> {
        self.at += 1;
        let mut items = Vec::new();
        loop {
            self.skip_space();
            if self.peek()? == close {
                self.at += 1;
                return Some(items);
            }
            items.push(self.value(depth + 1)?);
            self.skip_space();
            match self.peek()? {
                b',' => self.at += 1,
                c if c == close => {}
                _ => return None,
            }
        }
    }

    /// `{key: value, ...}`; keys as `json.dumps` writes them (strings; numbers, booleans and
    /// `None` as their JSON text).
    fn dict(&mut self, depth: usize) -> Option<Value> {
        self.at += 1;
        let mut fields = Map::new();
        loop {
            self.skip_space();
            if self.peek()? == b'}' {
                self.at += 1;
                return Some(Value::Object(fields));
            }
            let key = match self.value(depth + 1)? {
                Value::String(s) => s,
                Value::Array(_) | Value::Object(_) => return None,
                scalar => scalar.to_string(),
            };
            self.skip_space();
            if self.peek()? != b':' {
                return None;
            }
            self.at += 1;
            let value = self.value(depth + 1)?;
            fields.insert(key, value);
            self.skip_space();
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {}
                _ => return None,
            }
        }
    }

    /// A quoted string with Python's common escapes; a prefix (`r`, `b`, `f`) is not a
    /// literal here.
    fn string(&mut self) -> Option<String> {
        let quote = self.peek()?;
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.at += 1;
            match c {
                _ if c == quote => return String::from_utf8(out).ok(),
                b'\n' => return None,
                b'\\' => {
                    let e = self.peek()?;
                    self.at += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'0' => out.push(0),
                        b'\\' | b'\'' | b'"' => out.push(e),
                        b'u' => {
                            let hex = self.text.get(self.at..self.at + 4)?;
                            let code =
                                u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                            self.at += 4;
                            let ch = char::from_u32(code)?;
                            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                        }
                        _ => return None,
                    }
                }
                _ => out.push(c),
            }
        }
    }

    /// `None`, `True`, `False` or a number (a sign, digits, `_` separators, a fraction, an
    /// exponent).
    fn word(&mut self) -> Option<Value> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"+-._".contains(&c))
        {
            self.at += 1;
        }
        let word = std::str::from_utf8(&self.text[start..self.at]).ok()?;
        match word {
            "None" => return Some(Value::Null),
            "True" => return Some(Value::Bool(true)),
            "False" => return Some(Value::Bool(false)),
            _ => {}
        }
        let digits: String = word.chars().filter(|&c| c != '_').collect();
        if !digits
            .trim_start_matches(['+', '-'])
            .starts_with(|c: char| c.is_ascii_digit() || c == '.')
        {
            return None;
        }
        if let Ok(n) = digits.parse::<i64>() {
            return Some(Value::Number(n.into()));
        }
        let x: f64 = digits.parse().ok()?;
        Number::from_f64(x).map(Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_what_literal_eval_reads() {
        for (text, want) in [
            ("None", json!(null)),
            (" True ", json!(true)),
            ("False", json!(false)),
            ("-12", json!(-12)),
            ("1_000", json!(1000)),
            ("2.5", json!(2.5)),
            ("1e3", json!(1000.0)),
            ("'it\\'s'", json!("it's")),
            ("\"a\\nb\\u00e9\"", json!("a\nbé")),
            (
                "['a', True, None, (1, 2.0)]",
                json!(["a", true, null, [1, 2.0]]),
            ),
            ("(1,)", json!([1])),
            (
                "{'k': {'n': [1]}, 2: 'two',}",
                json!({"k": {"n": [1]}, "2": "two"}),
            ),
            ("[]", json!([])),
        ] {
            assert_eq!(parse(text), Some(want), "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_literal() {
        for text in [
            "", "none", "hello", "nan", "inf", "{1, 2}", "[1, 2", "'open", "1 2", "f(1)",
            "{'a' 1}", "b'x'", "'\\q'", "[[[[[[[[",
        ] {
            assert_eq!(parse(text), None, "{text}");
        }
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 2), "]".repeat(MAX_DEPTH + 2));
        assert_eq!(parse(&deep), None);
    }
}
