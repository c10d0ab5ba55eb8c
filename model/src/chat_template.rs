//! Chat templates from `tokenizer_config.json`, rendered as transformers' `apply_chat_template`
//! renders them: Jinja with `trim_blocks`, `lstrip_blocks` and loop controls, no kept trailing
//! newline, Python string methods (`strip`, `startswith`, ...), `raise_exception`,
//! `strftime_now`, transformers' own `tojson` (Python's `json.dumps`), the request's variables
//! (vLLM's `chat_template_kwargs`), and the tokenizer's `bos_token` / `eos_token`.
//! `tests/chat_templates.rs` holds this to transformers' renderings of real models' templates.

mod python_json;

use std::ffi::CString;

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

pub use python_json::python_float;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text, which `continue_final_message` looks in for the field it extends.
    source: String,
    bos_token: String,
    eos_token: String,
}

/// What a conversation is rendered with besides its messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct RenderOptions<'a> {
    /// The request's `tools`, as the template sees them.
    pub tools: Option<&'a Value>,
    /// The request's `documents` (retrieval templates read them).
    pub documents: Option<&'a Value>,
    /// End with the assistant's turn opened.
    pub add_generation_prompt: bool,
    /// End inside the last message, for the model to go on writing it (transformers' and
    /// vLLM's `continue_final_message`).
    pub continue_final_message: bool,
    /// More variables for the template (vLLM's `chat_template_kwargs`, e.g. Qwen3's
    /// `enable_thinking`); none may be one of [`RESERVED_VARIABLES`].
    pub variables: Option<&'a Map<String, Value>>,
}

/// Variables the server sets itself, which a request's `chat_template_kwargs` may not.
pub const RESERVED_VARIABLES: [&str; 7] = [
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "continue_final_message",
    "bos_token",
    "eos_token",
];

const NAME: &str = "chat";

/// transformers marks the end of the message it continues with this, then cuts there.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// The longest `strftime_now` format taken (templates write a date, not a page).
const MAX_STRFTIME_FORMAT: usize = 256;

fn template_error(message: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(format!("chat template: {message}"))
}

/// Python's `str.strip()` whitespace: Unicode's, plus the four separators `\x1c`..`\x1f`.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `strftime_now(format)`: the local time as Python's `datetime.now().strftime` writes it.
fn strftime_now(format: String) -> std::result::Result<String, JinjaError> {
    let invalid = |message: &str| JinjaError::new(ErrorKind::InvalidOperation, message.to_string());
    if format.len() > MAX_STRFTIME_FORMAT {
        return Err(invalid("strftime_now: format too long"));
    }
    let c_format =
        CString::new(format.as_str()).map_err(|_| invalid("strftime_now: NUL in format"))?;
    // SAFETY: `time` with a null pointer only returns the time; `localtime_r` writes the
    // zeroed `tm` we own; `strftime` writes at most `buf.len()` bytes into `buf` and reads the
    // NUL-terminated format and the filled `tm`.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return Err(invalid("strftime_now: no local time"));
        }
        let mut buf = vec![0u8; 64 + format.len() * 16];
        let written = libc::strftime(
            buf.as_mut_ptr().cast::<libc::c_char>(),
            buf.len(),
            c_format.as_ptr(),
            &tm,
        );
        buf.truncate(written);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", python_json::tojson_filter);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ModelError::Tokenizer(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ready for the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// As [`Self::render`], with any serializable messages (an assistant's `tool_calls`, a
    /// tool result's `tool_call_id`, as OpenAI sends them) and the request's `tools`, which
    /// the template sees as `tools` (as transformers passes them).
    pub fn render_with_tools<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_conversation(
            messages,
            &RenderOptions {
                tools,
                add_generation_prompt,
                ..RenderOptions::default()
            },
        )
    }

    /// The prompt for `messages` with everything a request may say about it.
    pub fn render_conversation<M: Serialize>(
        &self,
        messages: &[M],
        options: &RenderOptions<'_>,
    ) -> Result<String> {
        let mut messages: Vec<Value> = messages
            .iter()
            .map(serde_json::to_value)
            .collect::<std::result::Result<_, _>>()
            .map_err(template_error)?;
        let continued = if options.continue_final_message {
            Some(self.mark_final_message(&mut messages)?)
        } else {
            None
        };
        let mut context = Map::new();
        if let Some(variables) = options.variables {
            if let Some(name) = RESERVED_VARIABLES
                .iter()
                .find(|n| variables.contains_key(**n))
            {
                return Err(template_error(format!(
                    "`{name}` is set by the server, not by a request"
                )));
            }
            context.extend(variables.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        context.insert("messages".into(), Value::Array(messages));
        context.insert(
            "tools".into(),
            options.tools.cloned().unwrap_or(Value::Null),
        );
        context.insert(
            "documents".into(),
            options.documents.cloned().unwrap_or(Value::Null),
        );
        context.insert(
            "add_generation_prompt".into(),
            options.add_generation_prompt.into(),
        );
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let rendered = template
            .render(minijinja::Value::from_serialize(&context))
            .map_err(template_error)?;
        match continued {
            Some(final_message) => cut_after_final_message(rendered, &final_message),
            None => Ok(rendered),
        }
    }

    /// Tags the last message's content as transformers does for `continue_final_message`;
    /// returns the content as it was.
    fn mark_final_message(&self, messages: &mut [Value]) -> Result<String> {
        let Some(last) = messages.last_mut() else {
            return Err(template_error(
                "continue_final_message is set but the conversation is empty",
            ));
        };
        if !self.source.contains("content") {
            return Err(template_error(
                "continue_final_message is set but the template reads no message `content`",
            ));
        }
        let Some(Value::String(content)) = last.get_mut("content") else {
            return Err(template_error(
                "continue_final_message is set but the final message has no content to continue",
            ));
        };
        let original = content.clone();
        content.push_str(CONTINUE_TAG);
        Ok(original)
    }
}

/// The rendered conversation up to the end of the final message's text (transformers' cut).
fn cut_after_final_message(mut rendered: String, final_message: &str) -> Result<String> {
    let tag = CONTINUE_TAG.trim_end_matches(python_space);
    let message = final_message.trim_matches(python_space);
    let Some(at) = rendered.rfind(tag).filter(|_| rendered.contains(message)) else {
        return Err(template_error(
            "continue_final_message is set but the final message does not appear in the chat \
             after applying the chat template",
        ));
    };
    let kept_spacing = rendered[at..].starts_with(CONTINUE_TAG);
    rendered.truncate(at);
    if !kept_spacing {
        let end = rendered.trim_end_matches(python_space).len();
        rendered.truncate(end);
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn python_methods_whitespace_control_and_exceptions() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}\n  {% if m['role'] == 'bad' %}{{ raise_exception('no ' + m['role']) }}{% endif %}\n[{{ m['role'].upper() }}] {{ m['content'].strip() }}\n{% endfor %}\n",
            Some("<s>"),
            None,
        )
        .unwrap();
        let out = t
            .render(&[msg("user", "  hi "), msg("assistant", "yo")], true)
            .unwrap();
        assert_eq!(out, "<s>[USER] hi\n[ASSISTANT] yo\n");
        let err = t.render(&[msg("bad", "x")], true).unwrap_err().to_string();
        assert!(err.contains("no bad"), "{err}");
        assert!(ChatTemplate::new("{% for %}", None, None).is_err());
    }
}
