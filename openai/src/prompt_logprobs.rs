//! vLLM's `prompt_logprobs` over HTTP: every prompt token after the first scored given the
//! tokens before it, with its rank in the vocabulary and the k likeliest tokens there, in
//! vLLM's shape (a list with `null` for the first token, then a map from token id to
//! `{"logprob", "rank", "decoded_token"}`, the prompt's own token first). Completions carry it
//! on each choice, chat beside the choices. What lm-evaluation-harness and reward-model
//! pipelines read to score a text without generating it.

use moe_proto::v1::GenerateResponse;
use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::error::RouterError;

/// Most alternatives a request may ask for per token (OpenAI's limit for `logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// The smallest logprob written: JSON has no -inf (vLLM writes the same floor).
const LOWEST_LOGPROB: f32 = -9999.0;

/// The alternatives asked for, checked: 0 to [`MAX_TOP_LOGPROBS`] (vLLM's -1, the whole
/// vocabulary, is refused: 129,280 entries a prompt token), and not on a stream, whose chunks
/// have no place for them (vLLM refuses the same).
pub fn requested(k: Option<i64>, stream: bool) -> Result<Option<u32>, RouterError> {
    let Some(k) = k else {
        return Ok(None);
    };
    if stream {
        return Err(RouterError::invalid(
            "prompt_logprobs",
            "prompt_logprobs are not available when stream = true",
        ));
    }
    match u32::try_from(k) {
        Ok(k) if k <= MAX_TOP_LOGPROBS => Ok(Some(k)),
        _ => Err(RouterError::invalid(
            "prompt_logprobs",
            format!(
                "prompt_logprobs must be 0 to {MAX_TOP_LOGPROBS} (-1, the whole vocabulary, is not served)"
            ),
        )),
    }
}

/// One token's score at one prompt position (vLLM's `Logprob`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RankedLogprob {
    pub logprob: f32,
    pub rank: u32,
    pub decoded_token: String,
}

/// One prompt position's scores keyed by token id: the prompt's own token first, then the
/// likeliest tokens (most likely first) other than it. A map in JSON, in this order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PositionLogprobs(pub Vec<(u32, RankedLogprob)>);

impl Serialize for PositionLogprobs {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (id, score) in &self.0 {
            map.serialize_entry(id, score)?;
        }
        map.end()
    }
}

/// The prompt's scores from a choice's first message (which carries them), `k` alternatives a
/// position (the message may hold more, asked for by `echo` with `logprobs`); `name` writes a
/// token (its text, or `token_id:N`).
pub fn from_first_message(
    msg: &GenerateResponse,
    k: usize,
    name: impl Fn(u32) -> String,
) -> Vec<Option<PositionLogprobs>> {
    let mut out = Vec::with_capacity(msg.prompt_token_ids.len());
    if msg.prompt_token_ids.is_empty() {
        return out;
    }
    out.push(None);
    for (j, &id) in msg.prompt_token_ids[1..].iter().enumerate() {
        let (Some(&logprob), Some(&rank)) = (msg.prompt_logprobs.get(j), msg.prompt_ranks.get(j))
        else {
            out.push(None);
            continue;
        };
        let mut entries = vec![(
            id,
            RankedLogprob {
                logprob: logprob.max(LOWEST_LOGPROB),
                rank,
                decoded_token: name(id),
            },
        )];
        if let Some(top) = msg.prompt_top_logprobs.get(j) {
            let ranked = top.token_ids.iter().zip(&top.logprobs).take(k).enumerate();
            for (place, (&alt, &lp)) in ranked {
                if alt != id {
                    entries.push((
                        alt,
                        RankedLogprob {
                            logprob: lp.max(LOWEST_LOGPROB),
                            rank: place as u32 + 1,
                            decoded_token: name(alt),
                        },
                    ));
                }
            }
        }
        out.push(Some(PositionLogprobs(entries)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::TopLogprobs;
    use serde_json::json;

    #[test]
    fn requests_are_bounded_and_not_streamed() {
        assert_eq!(requested(None, true).unwrap(), None);
        assert_eq!(requested(Some(0), false).unwrap(), Some(0));
        assert_eq!(requested(Some(20), false).unwrap(), Some(20));
        for (k, stream) in [(21, false), (-1, false), (-5, false), (2, true), (0, true)] {
            match requested(Some(k), stream) {
                Err(RouterError::Invalid {
                    param: Some("prompt_logprobs"),
                    ..
                }) => {}
                other => panic!("{k} {stream}: {other:?}"),
            }
        }
    }

    #[test]
    fn positions_hold_the_prompt_token_first_then_the_others_in_vllms_shape() {
        let msg = GenerateResponse {
            prompt_token_ids: vec![5, 7, 9],
            prompt_logprobs: vec![-0.5, f32::NEG_INFINITY],
            prompt_ranks: vec![1, 40],
            prompt_top_logprobs: vec![
                TopLogprobs {
                    token_ids: vec![7, 3, 4],
                    logprobs: vec![-0.5, -1.5, -2.0],
                },
                TopLogprobs {
                    token_ids: vec![2, 3, 4],
                    logprobs: vec![-0.25, -2.5, -3.0],
                },
            ],
            ..Default::default()
        };
        let scores = from_first_message(&msg, 2, |id| format!("t{id}"));
        assert_eq!(
            serde_json::to_value(&scores).unwrap(),
            json!([
                null,
                {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "t7"},
                 "3": {"logprob": -1.5, "rank": 2, "decoded_token": "t3"}},
                {"9": {"logprob": -9999.0, "rank": 40, "decoded_token": "t9"},
                 "2": {"logprob": -0.25, "rank": 1, "decoded_token": "t2"},
                 "3": {"logprob": -2.5, "rank": 2, "decoded_token": "t3"}}
            ])
        );
        // The prompt's own token comes first in the map, whatever its rank.
        let text = serde_json::to_string(&scores[2]).unwrap();
        assert!(text.starts_with("{\"9\":"), "{text}");
        assert!(from_first_message(&GenerateResponse::default(), 2, |_| String::new()).is_empty());
    }
}
