//! Chat messages as `/v1/chat/completions` takes them: a [`RawMessage`] as the client sent it
//! (role, content as text or text parts, optional name and tool fields), checked into a
//! [`Message`] the chat template can render (content present where the role needs it; only text
//! parts). `stream_options` lives here too. Shapes follow OpenAI's chat API reference; what the
//! server does not read is refused with its field name rather than silently dropped.

use serde::{Deserialize, Deserializer};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use super::{text_or_array, ChatMessage, Object, TextOrArray};

/// A text part of a chat message's content (the only kind this server reads).
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    Text { text: String },
}

/// A chat message's content: a string, or text parts (joined).
#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    pub(super) fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .map(|ContentPart::Text { text }| text.as_str())
                .collect(),
        }
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MessageContent, D::Error> {
        const EXPECTING: &str =
            r#"a string or an array of text parts ({"type": "text", "text": ...})"#;
        Ok(match text_or_array(d, EXPECTING)? {
            TextOrArray::Text(t) => MessageContent::Text(t),
            TextOrArray::Array(parts) => {
                MessageContent::Parts(parts.into_iter().map(|Object(p)| p).collect())
            }
        })
    }
}

impl PartialSchema for MessageContent {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ArrayBuilder::new().items(Ref::from_schema_name(ContentPart::name())))
            .into()
    }
}

impl ToSchema for MessageContent {}

/// The roles a message may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
}

/// A message as it is read: every field checked for its type, `content` may be missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMessage {
    pub role: Role,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

/// Only an assistant's message may leave `content` out: serde's own words, so the field path
/// ends in `.content` (see [`super::json_error`]).
#[derive(Debug, thiserror::Error)]
#[error("missing field `content`")]
pub struct MissingContent;

impl TryFrom<Object<RawMessage>> for Message {
    type Error = MissingContent;

    fn try_from(Object(m): Object<RawMessage>) -> Result<Message, MissingContent> {
        let name = m.name;
        Ok(match (m.role, m.content) {
            (Role::Assistant, content) => Message::Assistant { content, name },
            (_, None) => return Err(MissingContent),
            (Role::System, Some(content)) => Message::System { content, name },
            (Role::Developer, Some(content)) => Message::Developer { content, name },
            (Role::User, Some(content)) => Message::User { content, name },
        })
    }
}

/// One message of a conversation. `developer` is OpenAI's newer name for `system` (and given to
/// the chat template as `system`); `name` is accepted and not given to the template.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(
    tag = "role",
    rename_all = "snake_case",
    deny_unknown_fields,
    try_from = "Object<RawMessage>"
)]
pub enum Message {
    System {
        content: MessageContent,
        name: Option<String>,
    },
    Developer {
        content: MessageContent,
        name: Option<String>,
    },
    User {
        content: MessageContent,
        name: Option<String>,
    },
    Assistant {
        content: Option<MessageContent>,
        name: Option<String>,
    },
}

impl Message {
    /// The message as the chat template takes it.
    pub(super) fn to_chat(&self) -> ChatMessage {
        match self {
            Message::System { content, .. } | Message::Developer { content, .. } => {
                ChatMessage::new("system", content.text())
            }
            Message::User { content, .. } => ChatMessage::new("user", content.text()),
            Message::Assistant { content, .. } => ChatMessage::new(
                "assistant",
                content
                    .as_ref()
                    .map(MessageContent::text)
                    .unwrap_or_default(),
            ),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// A last chunk with no choices carries `usage`; every chunk before it has `"usage": null`.
    pub include_usage: Option<bool>,
}
