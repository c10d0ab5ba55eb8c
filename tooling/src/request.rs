//! The greedy Generate request: temperature 0, past end-of-sequence, with logprobs, so that
//! its answer is a fixed sequence the offline engine computes the same.

use moe_proto::v1::GenerateRequest;

/// A greedy request for `input_ids` that generates exactly `max_new_tokens` tokens and
/// streams each one's logprob (checked bit for bit against the offline engine's).
pub fn greedy(input_ids: &[u32], max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        top_logprobs: None,
        prompt: None,
        input_ids: input_ids.to_vec(),
        max_new_tokens,
        temperature: Some(0.0),
        top_p: None,
        top_k: None,
        seed: None,
        stop: vec![],
        ignore_eos: true,
        logprobs: true,
        ..Default::default()
    }
}
