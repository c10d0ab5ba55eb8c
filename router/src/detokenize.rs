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
    /// Re-decodes the whole output (ids) so that multi-token characters come out whole.
    pub fn update(&mut self, tokenizer: &Tokenizer, ids: &[u32]) {
        self.text = tokenizer.decode(ids).unwrap_or_default();
    }

    /// The next final piece, keeping back the last `hold_back` bytes (a stop string may still
    /// be completing there) and nothing while the tail is an incomplete character (U+FFFD).
    pub fn pending(&mut self, hold_back: usize) -> String {
        if self.text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let mut end = self.text.len().saturating_sub(hold_back);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        self.take_until(end)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_and_never_splits_characters() {
        let mut t = IncrementalText {
            text: "abc딥".into(),
            ..Default::default()
        };
        assert_eq!(t.pending(2), "abc");
        t.text.push('\u{FFFD}');
        assert_eq!(t.pending(0), "");
        t.text = "abc딥x".into();
        assert_eq!(t.pending(0), "딥x");
        assert_eq!(t.take_until(2), "");
    }
}
