//! The `tojson` filter as transformers defines it for chat templates: Python's `json.dumps`
//! with `ensure_ascii=False`, not Jinja's HTML-safe compact form. Tool schemas reach the prompt
//! through it, so its spacing, key order, escapes and float spelling are tokens the model was
//! trained on (`{"name": "f", "maximum": 1e-05}`, never `{"maximum":1e-5,"name":"f"}`).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// How `json.dumps` was asked to write: its keyword arguments the filter takes.
#[derive(Debug, Clone)]
pub struct DumpOptions {
    pub ensure_ascii: bool,
    /// `None`: everything on one line.
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl Default for DumpOptions {
    fn default() -> Self {
        Self {
            ensure_ascii: false,
            indent: None,
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            sort_keys: false,
        }
    }
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// The filter: `value | tojson(ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, as transformers' signature reads (the first two also by position).
pub fn tojson_filter(
    value: Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let pick = |given: Option<Value>, name: &str| -> Result<Option<Value>, Error> {
        let named: Option<Value> = kwargs.get(name)?;
        match (given, named) {
            (Some(_), Some(_)) => Err(invalid(format!(
                "tojson() got multiple values for argument '{name}'"
            ))),
            (given, named) => Ok(given.or(named).filter(|v| !v.is_none())),
        }
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?;
    let indent = pick(indent, "indent")?;
    let separators = pick(None, "separators")?;
    let sort_keys = pick(None, "sort_keys")?;
    kwargs.assert_all_used()?;
    let mut options = DumpOptions {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
        ..DumpOptions::default()
    };
    if let Some(indent) = indent {
        options.indent = Some(match indent.as_str() {
            Some(text) => text.to_string(),
            None => {
                let width = i64::try_from(indent.clone()).map_err(|_| {
                    invalid(format!(
                        "tojson: indent must be an int or a string, not {indent}"
                    ))
                })?;
                " ".repeat(width.clamp(0, 64) as usize)
            }
        });
        // Python's default separators once an indent is given.
        options.item_separator = ",".into();
    }
    if let Some(separators) = separators {
        let pair: Vec<Value> = separators
            .try_iter()
            .map_err(|_| invalid("tojson: separators must be a pair of strings"))?
            .collect();
        match pair.as_slice() {
            [item, key] if item.as_str().is_some() && key.as_str().is_some() => {
                options.item_separator = item.as_str().unwrap_or_default().to_string();
                options.key_separator = key.as_str().unwrap_or_default().to_string();
            }
            _ => return Err(invalid("tojson: separators must be a pair of strings")),
        }
    }
    dumps(&value, &options)
}

/// `json.dumps(value, **options)`.
pub fn dumps(value: &Value, options: &DumpOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, options, 0)?;
    Ok(out)
}

/// The most text one `tojson` writes: a request's values are bounded by its body, but a
/// template can make a value that refers to itself (a namespace holding itself twice), whose
/// dump would grow without end.
const MAX_OUTPUT_BYTES: usize = 16 << 20;

fn write_value(
    out: &mut String,
    value: &Value,
    options: &DumpOptions,
    depth: usize,
) -> Result<(), Error> {
    // Python stops at its recursion limit; a template's values are the request's, bounded.
    if depth > 512 {
        return Err(invalid("tojson: value nested too deeply"));
    }
    if out.len() > MAX_OUTPUT_BYTES {
        return Err(invalid("tojson: value too large"));
    }
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
        ValueKind::Number => {
            let x = f64::try_from(value.clone()).map_err(|e| invalid(e.to_string()))?;
            out.push_str(&python_float(x));
        }
        ValueKind::String => write_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Seq => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, '[', ']', &items, options, depth, |out, item, depth| {
                write_value(out, item, options, depth)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((key_text(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                '{',
                '}',
                &entries,
                options,
                depth,
                |out, (key, item), depth| {
                    write_string(out, key, options.ensure_ascii);
                    out.push_str(&options.key_separator);
                    write_value(out, item, options, depth)
                },
            )?;
        }
        kind => {
            return Err(invalid(format!(
                "Object of type {kind} is not JSON serializable"
            )));
        }
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    open: char,
    close: char,
    items: &[T],
    options: &DumpOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &options.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&options.item_separator);
        }
        newline(out, depth + 1);
        write_item(out, item, depth + 1)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A key as `json.dumps` writes it: strings as they are, numbers, booleans and None spelt.
fn key_text(key: &Value) -> Result<String, Error> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number if key.is_integer() => key.to_string(),
        ValueKind::Number => {
            python_float(f64::try_from(key.clone()).map_err(|e| invalid(e.to_string()))?)
        }
        kind => {
            return Err(invalid(format!(
                "keys must be str, int, float, bool or None, not {kind}"
            )))
        }
    })
}

/// Python's string escapes: `\"`, `\\`, the five short control escapes, other control
/// characters as `\u00XX`; with `ensure_ascii` everything outside printable ASCII as `\uXXXX`
/// (UTF-16 surrogate pairs above the BMP), lowercase hex as Python writes it.
fn write_string(out: &mut String, text: &str, ensure_ascii: bool) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `repr(x)` of a Python float (what `json.dumps` writes): the shortest digits that read back,
/// fixed notation for exponents from -4 to 15, else `d.ddde+XX`; NaN and the infinities as
/// Python's JSON spells them.
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, as Python's repr does.
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exponent) {
        if exponent >= 0 {
            let whole = exponent as usize + 1;
            if digits.len() <= whole {
                out.push_str(&digits);
                out.push_str(&"0".repeat(whole - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..whole]);
                out.push('.');
                out.push_str(&digits[whole..]);
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exponent - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!(
            "e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_spelt_as_python_repr_spells_them() {
        for (x, python) in [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (2.5e-7, "2.5e-07"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (-3.0e100, "-3e+100"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float(x), python, "{x:e}");
        }
    }

    #[test]
    fn strings_escape_as_python_does_with_and_without_ensure_ascii() {
        let text = "a\"b\\c\n\t\u{1}\u{7f}é東😀\u{2028}<&>'";
        let mut plain = String::new();
        write_string(&mut plain, text, false);
        assert_eq!(plain, "\"a\\\"b\\\\c\\n\\t\\u0001\u{7f}é東😀\u{2028}<&>'\"");
        let mut ascii = String::new();
        write_string(&mut ascii, text, true);
        assert_eq!(
            ascii,
            "\"a\\\"b\\\\c\\n\\t\\u0001\\u007f\\u00e9\\u6771\\ud83d\\ude00\\u2028<&>'\""
        );
    }

    #[test]
    fn a_value_holding_itself_is_refused_not_dumped_forever() {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson_filter);
        let template =
            "{% set ns = namespace(a=1) %}{% set ns.b = ns %}{% set ns.c = ns %}{{ ns | tojson }}";
        let err = env.render_str(template, ()).unwrap_err().to_string();
        assert!(err.contains("tojson"), "{err}");
    }

    #[test]
    fn containers_keep_their_order_and_python_spacing() {
        let value =
            Value::from_serialize(serde_json::json!({"b": [1, 2.0, null], "a": {}, "c": []}));
        let options = DumpOptions::default();
        assert_eq!(
            dumps(&value, &options).unwrap(),
            r#"{"b": [1, 2.0, null], "a": {}, "c": []}"#
        );
        let indented = DumpOptions {
            indent: Some("  ".into()),
            item_separator: ",".into(),
            sort_keys: true,
            ..DumpOptions::default()
        };
        assert_eq!(
            dumps(&value, &indented).unwrap(),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.0,\n    null\n  ],\n  \"c\": []\n}"
        );
    }
}
