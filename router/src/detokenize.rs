//! Incremental detokenization: emits only text that is final, never half a UTF-8 character.

use moe_model::tokenizer::Tokenizer;

#[derive(Debug, Default)]
pub struct IncrementalText {
    /// Bytes of the decoded text already emitted.
    emitted: usize,
    /// The full decoded text of the output so far.
    pub text: String,
}

impl IncrementalText {
    /// Re-decodes `ids` and returns the new final piece (empty while the tail is an incomplete
    /// character, which decodes to U+FFFD).
    pub fn push(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> String {
        self.text = tokenizer.decode(ids).unwrap_or_default();
        if self.text.ends_with('\u{FFFD}') {
            return String::new();
        }
        self.take_until(self.text.len())
    }

    /// Emits whatever is left up to byte `end` (used at the end and at stop strings).
    pub fn take_until(&mut self, end: usize) -> String {
        if end <= self.emitted
            || !self.text.is_char_boundary(end)
            || !self.text.is_char_boundary(self.emitted)
        {
            return String::new();
        }
        let piece = self.text[self.emitted..end].to_string();
        self.emitted = end;
        piece
    }

    pub fn emitted(&self) -> usize {
        self.emitted
    }
}
