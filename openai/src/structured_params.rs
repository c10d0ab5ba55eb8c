//! Where an OpenAI-style request asks for structured output: OpenAI's `response_format`
//! (`json_object`, `json_schema`), vLLM's `structured_outputs` (`json`, `regex`, `choice`,
//! `grammar`) and its older `guided_json` / `guided_regex` / `guided_choice` /
//! `guided_grammar`. At most one may ask; the grammar itself is compiled at admission.

use moe_proto::v1::structured_output::Kind;
use moe_proto::v1::{ChoiceList, StructuredOutput};
use serde_json::{Map, Value};

use crate::error::RouterError;

fn schema_text(schema: &Value, param: &'static str) -> Result<String, RouterError> {
    match schema {
        // vLLM accepts a schema given as its JSON text too.
        Value::String(text) => Ok(text.clone()),
        Value::Object(_) | Value::Bool(_) => Ok(schema.to_string()),
        _ => Err(RouterError::invalid(param, "a JSON schema is an object")),
    }
}

fn string(value: &Value, param: &'static str, what: &str) -> Result<String, RouterError> {
    value
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| RouterError::invalid(param, format!("{what} must be a string")))
}

fn choices(value: &Value, param: &'static str) -> Result<Kind, RouterError> {
    let list = value
        .as_array()
        .filter(|l| !l.is_empty())
        .ok_or_else(|| RouterError::invalid(param, "choice must be a list of strings"))?;
    let choices = list
        .iter()
        .map(|c| string(c, param, "each choice"))
        .collect::<Result<_, _>>()?;
    Ok(Kind::Choice(ChoiceList { choices }))
}

fn from_response_format(format: &Value) -> Result<Option<Kind>, RouterError> {
    const P: &str = "response_format";
    match format.get("type").and_then(Value::as_str) {
        None if format.is_null() => Ok(None),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Kind::JsonObject(true))),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| RouterError::invalid(P, "json_schema needs `json_schema.schema`"))?;
            Ok(Some(Kind::JsonSchema(schema_text(schema, P)?)))
        }
        _ => Err(RouterError::invalid(
            P,
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

fn from_structured_outputs(spec: &Value) -> Result<Option<Kind>, RouterError> {
    const P: &str = "structured_outputs";
    let Some(fields) = spec.as_object() else {
        return if spec.is_null() {
            Ok(None)
        } else {
            Err(RouterError::invalid(P, "structured_outputs is an object"))
        };
    };
    let mut kinds = Vec::new();
    for (name, value) in fields {
        if value.is_null() {
            continue;
        }
        kinds.push(match name.as_str() {
            "json" => Kind::JsonSchema(schema_text(value, P)?),
            "json_object" if value.as_bool() == Some(true) => Kind::JsonObject(true),
            "regex" => Kind::Regex(string(value, P, "regex")?),
            "choice" => choices(value, P)?,
            "grammar" => Kind::Grammar(string(value, P, "grammar")?),
            other => {
                return Err(RouterError::invalid(
                    P,
                    format!(
                    "structured_outputs.{other} is not supported (json, regex, choice, grammar)"
                ),
                ))
            }
        });
    }
    match kinds.len() {
        0 => Ok(None),
        1 => Ok(kinds.pop()),
        _ => Err(RouterError::invalid(
            P,
            "give one of json, regex, choice, grammar",
        )),
    }
}

fn from_guided(extra: &Map<String, Value>) -> Result<Vec<Kind>, RouterError> {
    let mut kinds = Vec::new();
    if let Some(v) = extra.get("guided_json").filter(|v| !v.is_null()) {
        kinds.push(Kind::JsonSchema(schema_text(v, "guided_json")?));
    }
    if let Some(v) = extra.get("guided_regex").filter(|v| !v.is_null()) {
        kinds.push(Kind::Regex(string(v, "guided_regex", "guided_regex")?));
    }
    if let Some(v) = extra.get("guided_choice").filter(|v| !v.is_null()) {
        kinds.push(choices(v, "guided_choice")?);
    }
    if let Some(v) = extra.get("guided_grammar").filter(|v| !v.is_null()) {
        kinds.push(Kind::Grammar(string(
            v,
            "guided_grammar",
            "guided_grammar",
        )?));
    }
    Ok(kinds)
}

/// The request's structured-output constraint, if it asks for one.
pub fn structured_output(
    response_format: Option<&Value>,
    structured_outputs: Option<&Value>,
    extra: &Map<String, Value>,
) -> Result<Option<StructuredOutput>, RouterError> {
    let mut kinds = from_guided(extra)?;
    if let Some(kind) = response_format
        .map(from_response_format)
        .transpose()?
        .flatten()
    {
        kinds.push(kind);
    }
    if let Some(kind) = structured_outputs
        .map(from_structured_outputs)
        .transpose()?
        .flatten()
    {
        kinds.push(kind);
    }
    if kinds.len() > 1 {
        return Err(RouterError::invalid(
            "structured_outputs",
            "ask for one structured output: response_format, structured_outputs or guided_*",
        ));
    }
    Ok(kinds
        .pop()
        .map(|kind| StructuredOutput { kind: Some(kind) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kind(rf: Value, so: Value) -> Result<Option<Kind>, RouterError> {
        structured_output(Some(&rf), Some(&so), &Map::new()).map(|s| s.and_then(|s| s.kind))
    }

    #[test]
    fn each_way_of_asking_gives_its_kind() {
        assert_eq!(kind(json!({"type": "text"}), Value::Null).unwrap(), None);
        assert_eq!(
            kind(json!({"type": "json_object"}), Value::Null).unwrap(),
            Some(Kind::JsonObject(true))
        );
        assert_eq!(
            kind(
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}),
                Value::Null
            )
            .unwrap(),
            Some(Kind::JsonSchema(r#"{"type":"string"}"#.into()))
        );
        assert_eq!(
            kind(Value::Null, json!({"regex": "a+"})).unwrap(),
            Some(Kind::Regex("a+".into()))
        );
        assert_eq!(
            kind(Value::Null, json!({"choice": ["x", "y"]})).unwrap(),
            Some(Kind::Choice(ChoiceList {
                choices: vec!["x".into(), "y".into()]
            }))
        );
        let mut extra = Map::new();
        extra.insert("guided_regex".into(), json!("[0-9]+"));
        assert!(structured_output(None, None, &extra).unwrap().is_some());
    }

    #[test]
    fn malformed_or_several_requests_are_refused_by_name() {
        for (rf, so, param) in [
            (
                json!({"type": "json_schema"}),
                Value::Null,
                "response_format",
            ),
            (json!({"type": "yaml"}), Value::Null, "response_format"),
            (Value::Null, json!({"choice": []}), "structured_outputs"),
            (Value::Null, json!({"regex": 5}), "structured_outputs"),
            (Value::Null, json!({"ebnf": "x"}), "structured_outputs"),
            (
                json!({"type": "json_object"}),
                json!({"regex": "a"}),
                "structured_outputs",
            ),
        ] {
            match kind(rf.clone(), so.clone()) {
                Err(RouterError::Invalid { param: Some(p), .. }) => assert_eq!(p, param),
                other => panic!("{rf} {so}: {other:?}"),
            }
        }
    }
}
