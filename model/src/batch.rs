//! The shape of one forward step: several sequences, each contributing a contiguous run of rows
//! (a prefill chunk or a single decode token) at its own positions. This is what continuous
//! batching feeds the model.

/// One sequence's rows in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// First row of this sequence in the step's flattened rows.
    pub first_row: usize,
    /// Number of new tokens this step.
    pub len: usize,
    /// Position of the first new token (the number of tokens already cached).
    pub start_pos: usize,
}

/// Row layout of a step.
#[derive(Debug, Clone, Default)]
pub struct BatchLayout {
    pub seqs: Vec<SeqSpan>,
    /// For each row, the index of its sequence in `seqs`.
    pub row_seq: Vec<usize>,
    /// For each row, its absolute position.
    pub row_pos: Vec<usize>,
}

impl BatchLayout {
    /// Builds a layout from `(cached_len, new_tokens)` per sequence.
    pub fn new(spans: impl IntoIterator<Item = (usize, usize)>) -> Self {
        let mut layout = BatchLayout::default();
        for (start_pos, len) in spans {
            let s = layout.seqs.len();
            layout.seqs.push(SeqSpan {
                first_row: layout.row_seq.len(),
                len,
                start_pos,
            });
            for i in 0..len {
                layout.row_seq.push(s);
                layout.row_pos.push(start_pos + i);
            }
        }
        layout
    }

    pub fn num_rows(&self) -> usize {
        self.row_seq.len()
    }
}
