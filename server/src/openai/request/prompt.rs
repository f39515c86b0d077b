//! The prompt-side field types of the OpenAI bodies: token ids ([`TokenId`], a `u32` whose schema
//! the served document narrows to the vocabulary), `prompt` ([`Prompt`]: a string, token ids, or a
//! batch of either) and `stop` ([`Stop`]: a string or up to four). Each type deserializes exactly
//! what its hand-written schema ([`PartialSchema`]) says, so the OpenAPI document and the parser
//! cannot drift apart; an empty string or list is refused with the field's name. Shapes follow
//! OpenAI's API reference for `/v1/completions` and `/v1/chat/completions`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// A token id (`u32`). Its schema's `maximum` is `u32::MAX` here; the served document states
/// the served model's last id (see [`crate::openapi::document`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct TokenId(pub u32);

impl PartialSchema for TokenId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .maximum(Some(u32::MAX as usize))
            .description(Some(
                "A token id of the served model's vocabulary (below `vocab_size` in /v1/models).",
            ))
            .into()
    }
}

impl ToSchema for TokenId {}

pub(super) fn ids(tokens: &[TokenId]) -> Vec<u32> {
    tokens.iter().map(|t| t.0).collect()
}

/// Read the rest of an array of token ids onto `ids` (those read before it).
fn rest_of_ids<'de, A: SeqAccess<'de>>(
    mut seq: A,
    mut ids: Vec<u32>,
) -> Result<Vec<u32>, A::Error> {
    while let Some(TokenId(t)) = seq.next_element()? {
        ids.push(t);
    }
    Ok(ids)
}

/// A value that is a string or an array of `T`.
pub(super) enum TextOrArray<T> {
    Text(String),
    Array(Vec<T>),
}

/// Read a [`TextOrArray`]; `expecting` is serde's words for it when it is neither.
pub(super) fn text_or_array<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    expecting: &'static str,
) -> Result<TextOrArray<T>, D::Error> {
    struct TextOrArrayVisitor<T>(&'static str, PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for TextOrArrayVisitor<T> {
        type Value = TextOrArray<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<TextOrArray<T>, E> {
            Ok(TextOrArray::Text(v.to_string()))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TextOrArray<T>, A::Error> {
            let mut all = Vec::new();
            while let Some(item) = seq.next_element()? {
                all.push(item);
            }
            Ok(TextOrArray::Array(all))
        }
    }
    d.deserialize_any(TextOrArrayVisitor(expecting, PhantomData))
}

/// A string of at least one character.
fn non_empty_text() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
}

/// The `prompt` of a completion: text or token ids, alone or as the one element of an array
/// (this server takes one prompt per request).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Prompt, D::Error> {
        /// One element of a prompt array.
        enum Item {
            Token(u32),
            Text(String),
            Tokens(Vec<u32>),
        }
        impl<'de> Deserialize<'de> for Item {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Item, D::Error> {
                struct ItemVisitor;
                impl<'de> Visitor<'de> for ItemVisitor {
                    type Value = Item;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a token id, a string or an array of token ids")
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Item, E> {
                        u32::try_from(v)
                            .map(Item::Token)
                            .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &"u32"))
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Item, E> {
                        u64::try_from(v)
                            .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &"u32"))
                            .and_then(|v| self.visit_u64(v))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
                        Ok(Item::Text(v.to_string()))
                    }
                    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item, A::Error> {
                        rest_of_ids(seq, Vec::new()).map(Item::Tokens)
                    }
                }
                d.deserialize_any(ItemVisitor)
            }
        }

        struct PromptVisitor;
        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an array of token ids, or an array of one of those")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                const N1: &str = "this server takes one prompt per request (n = 1); send one string or one array of token ids";
                let prompt = match seq.next_element::<Item>()? {
                    None => return Ok(Prompt::Tokens(Vec::new())),
                    Some(Item::Token(first)) => {
                        return rest_of_ids(seq, vec![first]).map(Prompt::Tokens)
                    }
                    Some(Item::Text(text)) => Prompt::Text(text),
                    Some(Item::Tokens(ids)) => Prompt::Tokens(ids),
                };
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(N1));
                }
                Ok(prompt)
            }
        }
        d.deserialize_any(PromptVisitor)
    }
}

impl PartialSchema for Prompt {
    fn schema() -> RefOr<Schema> {
        let tokens = || {
            ArrayBuilder::new()
                .items(Ref::from_schema_name(TokenId::name()))
                .min_items(Some(1))
        };
        OneOfBuilder::new()
            .item(non_empty_text())
            .item(tokens())
            .item(
                ArrayBuilder::new()
                    .items(non_empty_text())
                    .min_items(Some(1))
                    .max_items(Some(1)),
            )
            .item(
                ArrayBuilder::new()
                    .items(tokens())
                    .min_items(Some(1))
                    .max_items(Some(1)),
            )
            .description(Some(
                "One prompt: text (tokenized with the model's tokenizer, special tokens added) or token ids, alone or as the one element of an array. It must leave room for output in the context (`max_model_len` in /v1/models).",
            ))
            .into()
    }
}

impl ToSchema for Prompt {}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq)]
pub struct Stop(pub Vec<String>);

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Stop, D::Error> {
        Ok(Stop(
            match text_or_array(d, "a string or an array of strings")? {
                TextOrArray::Text(s) => vec![s],
                TextOrArray::Array(all) => all,
            },
        ))
    }
}

impl PartialSchema for Stop {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(non_empty_text())
            .item(ArrayBuilder::new().items(non_empty_text()))
            .description(Some(
                "The output ends just before the first of these strings (which it leaves out).",
            ))
            .into()
    }
}

impl ToSchema for Stop {}
