//! Chat templates: the Jinja template from `tokenizer_config.json`, rendered with `minijinja`
//! the way Hugging Face `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`,
//! Python string methods, `raise_exception`, `tojson`, `strftime_now`, loop controls).
//!
//! A template that does not compile is a broken model folder ([`TemplateError::Compile`], found
//! when the model loads); one that fails while rendering a request, including on purpose with
//! `raise_exception`, is the request's fault ([`TemplateError::Render`], a 400 naming why).

use std::fmt::Write;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};

const NAME: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("the chat template does not compile: {0}")]
    Compile(String),
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether the template names the `developer` role (newer OpenAI clients send it where
    /// older templates only know `system`).
    knows_developer: bool,
    /// Whether it renders a `tools` variable, and the call format its markers show.
    renders_tools: bool,
    tool_format: Option<crate::tools::ToolFormat>,
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: local time, as Llama 3 templates use it for "Today Date".
fn strftime_now(format: String) -> Result<String, Error> {
    let mut out = String::new();
    // Display of an invalid format returns fmt::Error (to_string would panic).
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

/// The message of a render error, with its cause chain (minijinja wraps `raise_exception`).
fn describe(e: &Error) -> String {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        let _ = write!(msg, " (template line {line})");
    }
    msg
}

impl ChatTemplate {
    /// Whether the template renders the request's `tools`.
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// The tool-call format the template's markers show (Hermes `<tool_call>`, Mistral
    /// `[TOOL_CALLS]`, Llama 3 `<|python_tag|>`).
    pub fn tool_format(&self) -> Option<crate::tools::ToolFormat> {
        self.tool_format
    }

    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TemplateError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        Ok(Self {
            env,
            knows_developer: source.contains("developer"),
            renders_tools: source.contains("tools"),
            tool_format: crate::tools::ToolFormat::detect(source),
        })
    }

    /// Whether the template names the `developer` role; when it does not, developer
    /// messages are rendered as system messages.
    pub fn knows_developer(&self) -> bool {
        self.knows_developer
    }

    /// Renders with `context` (messages, add_generation_prompt, bos_token, ... as the caller
    /// builds them).
    pub fn render(&self, context: &serde_json::Value) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        tmpl.render(Value::from(minijinja::value::Serde(context)))
            .map_err(|e| TemplateError::Render(describe(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(src: &str, ctx: serde_json::Value) -> Result<String, TemplateError> {
        ChatTemplate::new(src)?.render(&ctx)
    }

    #[test]
    fn python_methods_loop_controls_and_generation_prompt() {
        let src = "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
                   <{{ m.role.upper() }}>{{ m.content.strip() }}\n{% endfor %}\
                   {% if add_generation_prompt %}<ASSISTANT>{% endif %}";
        let out = render(
            src,
            json!({"messages": [{"role": "user", "content": "  hi  "}, {"role": "skip", "content": "x"}],
                   "add_generation_prompt": true}),
        )
        .unwrap();
        assert_eq!(out, "<USER>hi\n<ASSISTANT>");
    }

    #[test]
    fn tojson_and_strftime_now() {
        let out = render(
            "{{ tools | tojson }} {{ strftime_now('%Y') }}",
            json!({"tools": [{"name": "f", "b": 1, "a": 2}]}),
        )
        .unwrap();
        let year = chrono::Local::now().format("%Y").to_string();
        // As Python's json.dumps writes it, in the client's key order.
        assert_eq!(out, format!(r#"[{{"name": "f", "b": 1, "a": 2}}] {year}"#));
    }

    #[test]
    fn raise_exception_is_a_render_error_with_its_message() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}";
        let e = render(
            src,
            json!({"messages": [{"role": "assistant", "content": "x"}]}),
        )
        .unwrap_err();
        match e {
            TemplateError::Render(m) => {
                assert!(m.contains("must start with a user message"), "{m}")
            }
            other => panic!("expected a render error, got {other:?}"),
        }
    }

    #[test]
    fn broken_template_fails_to_compile() {
        assert!(matches!(
            ChatTemplate::new("{% for m in messages %}"),
            Err(TemplateError::Compile(_))
        ));
    }

    #[test]
    fn bad_strftime_format_is_an_error_not_a_panic() {
        assert!(render("{{ strftime_now('%Q%') }}", json!({})).is_err());
    }
}
