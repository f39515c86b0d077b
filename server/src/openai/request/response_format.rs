//! `response_format` (both endpoints): free text, any JSON object, or JSON that validates against
//! a JSON Schema — OpenAI's three formats, read into the engine's
//! [`vkv_engine::structured_output::ResponseFormat`]. The schema itself is checked when it is
//! compiled (llguidance, in `api`); here only the envelope.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;
use vkv_engine::structured_output::ResponseFormat as EngineFormat;

use crate::error::ApiError;

/// What the output must be.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text (the default).
    Text {},
    /// Any JSON object (compact: no whitespace between tokens).
    JsonObject {},
    /// JSON that validates against `json_schema.schema` (compact).
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// A named JSON Schema for the output.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// Letters, digits, `_` and `-`, at most 64 (as OpenAI requires).
    #[schema(pattern = "^[a-zA-Z0-9_-]{1,64}$")]
    pub name: String,
    /// Accepted and not used.
    pub description: Option<String>,
    /// A JSON Schema (draft 2020-12) the output validates against; none: any JSON value.
    /// Keywords llguidance does not implement (e.g. `uniqueItems`, `contains`,
    /// `patternProperties` with other constraints), `$ref`s it cannot resolve and schemas no
    /// value can match are refused with a 400 naming the problem.
    #[serde(default, deserialize_with = "crate::openai::optional_object")]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Map<String, Value>>,
    /// Accepted: output always follows the schema.
    pub strict: Option<bool>,
}

impl ResponseFormat {
    /// The format the engine constrains to; `None` for free text. The name is checked here.
    pub fn to_engine(&self) -> Result<Option<EngineFormat>, ApiError> {
        Ok(match self {
            ResponseFormat::Text {} => None,
            ResponseFormat::JsonObject {} => Some(EngineFormat::JsonObject),
            ResponseFormat::JsonSchema { json_schema } => {
                let name = &json_schema.name;
                let valid = (1..=64).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !valid {
                    return Err(ApiError::field(
                        "response_format.json_schema.name",
                        format!(
                            "`response_format.json_schema.name` must be 1 to 64 letters, digits, `_` or `-`, found {name:?}"
                        ),
                    ));
                }
                Some(EngineFormat::JsonSchema(
                    json_schema
                        .schema
                        .clone()
                        .map_or(Value::Bool(true), Value::Object),
                ))
            }
        })
    }
}
