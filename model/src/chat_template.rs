//! Chat templates from `tokenizer_config.json`, rendered as transformers' `apply_chat_template`
//! renders them: Jinja with `trim_blocks` and `lstrip_blocks`, no kept trailing newline, Python
//! string methods (`strip`, `startswith`, ...), `raise_exception`, and the tokenizer's
//! `bos_token` / `eos_token` in the context.

use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;

use crate::error::{ModelError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat";

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
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| ModelError::Tokenizer(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
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
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ModelError::Tokenizer(format!("chat template: {e}")))
    }
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
