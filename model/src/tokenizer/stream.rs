//! Streaming detokenization: [`StreamDecoder`] turns generated ids into text one token at a time
//! and never emits half a UTF-8 character. The window scheme is HF `tokenizers`' `DecodeStream` and
//! vLLM's incremental detokenizer.

use std::fmt;

use super::{Tokenizer, TokenizerError};

/// Turns generated ids into text one token at a time.
///
/// It keeps a window of ids: the ids of the text it last emitted (context, so that decoders that
/// look at neighbours render the same way) followed by ids not emitted yet. Each push decodes the
/// window; while the result ends in U+FFFD (a UTF-8 sequence still incomplete) or adds nothing,
/// nothing is emitted; otherwise the text after the context is emitted and the window moves on.
/// A replacement character that no later byte can complete is emitted with the text after it, or
/// by [`StreamDecoder::finish`].
pub struct StreamDecoder<'a> {
    pub(super) tokenizer: &'a Tokenizer,
    pub(super) ids: Vec<u32>,
    /// `decode(ids[..prefix_len])`, the context already emitted.
    pub(super) prefix: String,
    pub(super) prefix_len: usize,
}

impl fmt::Debug for StreamDecoder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("ids", &self.ids)
            .field("prefix", &self.prefix)
            .field("prefix_len", &self.prefix_len)
            .finish_non_exhaustive()
    }
}

impl StreamDecoder<'_> {
    /// Add one generated token; returns the new text that is now final (possibly empty): never half
    /// a UTF-8 character and never text that a later token could still change. Concatenating every
    /// returned piece plus `finish()` equals `decode(all ids, skip_special=false)`.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let text = match self.tokenizer.decode(&self.ids, false) {
            Ok(text) => text,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let fresh = self.after_prefix(text)?;
        self.ids.drain(..self.prefix_len);
        self.prefix_len = self.ids.len();
        self.prefix = self.tokenizer.decode(&self.ids, false)?;
        Ok(fresh)
    }

    /// The text still held back (an incomplete UTF-8 sequence at the end decodes to U+FFFD here).
    pub fn finish(self) -> Result<String, TokenizerError> {
        if self.ids.len() == self.prefix_len {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, false)?;
        self.after_prefix(text)
    }

    fn after_prefix(&self, text: String) -> Result<String, TokenizerError> {
        match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => Ok(rest.to_owned()),
            None => Err(TokenizerError::StreamPrefix {
                expected: self.prefix.clone(),
                found: text,
            }),
        }
    }
}
