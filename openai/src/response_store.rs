//! Stored responses of the Responses API (`store`, `previous_response_id`,
//! `GET`/`DELETE /v1/responses/{id}`), in memory, bounded in bytes.
//!
//! Each response keeps its own input items, its response object (whose `output` the next turn
//! reads) and the id of the response it followed: a conversation is walked back through those
//! links, so a long conversation costs its turns once, not once per turn. The least recently
//! used responses go first when the bytes run out; walking a conversation uses every turn in
//! it, so a conversation in use keeps its early turns. Ids are random (unguessable): holding
//! one is what reading, continuing or deleting a response takes, as on OpenAI's API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::Value;

/// Turns walked back at most to rebuild a conversation.
pub const MAX_CONVERSATION_TURNS: usize = 1024;

/// A conversation that cannot be rebuilt.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("no stored response has id `{0}` (never stored, deleted, or evicted for room)")]
    NotFound(String),
    #[error("the conversation is longer than {MAX_CONVERSATION_TURNS} stored responses")]
    TooLong,
}

struct Stored {
    previous: Option<String>,
    input: Vec<Value>,
    response: Value,
    bytes: usize,
    /// When it was last used, its key in [`Inner::by_use`].
    used: u64,
}

#[derive(Default)]
struct Inner {
    responses: HashMap<String, Stored>,
    /// Ids by last use, oldest first.
    by_use: BTreeMap<u64, String>,
    bytes: usize,
    clock: u64,
}

impl Inner {
    fn touch(&mut self, id: &str) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(stored) = self.responses.get_mut(id) {
            self.by_use.remove(&stored.used);
            stored.used = clock;
            self.by_use.insert(clock, id.to_string());
        }
    }

    fn remove(&mut self, id: &str) -> Option<Stored> {
        let stored = self.responses.remove(id)?;
        self.by_use.remove(&stored.used);
        self.bytes -= stored.bytes;
        Some(stored)
    }
}

pub struct ResponseStore {
    capacity_bytes: usize,
    inner: Mutex<Inner>,
}

impl ResponseStore {
    pub fn new(capacity_bytes: usize) -> Self {
        Self {
            capacity_bytes,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding it leaves whole entries: the data stays usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `response` (its `id` the key), the `input` items it answered and the response it
    /// followed, evicting the least recently used until it fits; one larger than the whole
    /// capacity is not kept.
    pub fn put(&self, previous: Option<String>, input: Vec<Value>, response: Value) {
        let Some(id) = response
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return;
        };
        let bytes = id.len()
            + previous.as_ref().map_or(0, String::len)
            + input.iter().map(json_bytes).sum::<usize>()
            + json_bytes(&response);
        if bytes > self.capacity_bytes {
            return;
        }
        let mut inner = self.lock();
        inner.remove(&id);
        while inner.bytes + bytes > self.capacity_bytes {
            let Some((_, oldest)) = inner.by_use.pop_first() else {
                break;
            };
            inner.remove(&oldest);
        }
        inner.clock += 1;
        let used = inner.clock;
        inner.by_use.insert(used, id.clone());
        inner.bytes += bytes;
        inner.responses.insert(
            id,
            Stored {
                previous,
                input,
                response,
                bytes,
                used,
            },
        );
    }

    /// The response object stored as `id`.
    pub fn get(&self, id: &str) -> Option<Value> {
        let mut inner = self.lock();
        inner.touch(id);
        inner.responses.get(id).map(|s| s.response.clone())
    }

    /// The input items `id` answered (its own turn's, not the earlier turns').
    pub fn input_items(&self, id: &str) -> Option<Vec<Value>> {
        let mut inner = self.lock();
        inner.touch(id);
        inner.responses.get(id).map(|s| s.input.clone())
    }

    /// Forgets `id`; false when it was not stored.
    pub fn delete(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    /// The conversation up to and including response `id`, as input items in order: each
    /// turn's input, then its output.
    pub fn conversation(&self, id: &str) -> Result<Vec<Value>, StoreError> {
        let mut inner = self.lock();
        let mut turns = Vec::new();
        let mut next = Some(id.to_string());
        while let Some(at) = next {
            if turns.len() == MAX_CONVERSATION_TURNS {
                return Err(StoreError::TooLong);
            }
            inner.touch(&at);
            let stored = inner
                .responses
                .get(&at)
                .ok_or_else(|| StoreError::NotFound(at.clone()))?;
            next = stored.previous.clone();
            turns.push(at);
        }
        let mut items = Vec::new();
        for at in turns.iter().rev() {
            let Some(stored) = inner.responses.get(at) else {
                return Err(StoreError::NotFound(at.clone()));
            };
            items.extend(stored.input.iter().cloned());
            if let Some(output) = stored.response.get("output").and_then(Value::as_array) {
                items.extend(output.iter().cloned());
            }
        }
        Ok(items)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

fn json_bytes(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response(id: &str, text: &str) -> Value {
        json!({"id": id, "object": "response", "output": [
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
        ]})
    }

    fn user(text: &str) -> Value {
        json!({"type": "message", "role": "user", "content": text})
    }

    #[test]
    fn a_conversation_is_each_turns_input_then_output_in_order() {
        let store = ResponseStore::new(1 << 20);
        store.put(None, vec![user("a")], response("r1", "A"));
        store.put(Some("r1".into()), vec![user("b")], response("r2", "B"));
        store.put(Some("r2".into()), vec![user("c")], response("r3", "C"));
        let texts: Vec<String> = store
            .conversation("r3")
            .unwrap()
            .iter()
            .map(|item| match &item["content"] {
                Value::String(s) => s.clone(),
                parts => parts[0]["text"].as_str().unwrap().to_string(),
            })
            .collect();
        assert_eq!(texts, ["a", "A", "b", "B", "c", "C"]);
        assert_eq!(store.get("r2").unwrap()["id"], "r2");
        assert_eq!(store.input_items("r2").unwrap(), [user("b")]);
        assert!(store.delete("r2"));
        assert!(!store.delete("r2"));
        assert_eq!(store.get("r2"), None);
        assert_eq!(
            store.conversation("r3"),
            Err(StoreError::NotFound("r2".into()))
        );
        assert_eq!(
            store.conversation("nope"),
            Err(StoreError::NotFound("nope".into()))
        );
    }

    #[test]
    fn the_least_recently_used_go_when_the_bytes_run_out() {
        let one = {
            let probe = ResponseStore::new(1 << 20);
            probe.put(None, vec![user("x")], response("r0", "y"));
            probe.bytes()
        };
        // Room for three of them.
        let store = ResponseStore::new(3 * one + one / 2);
        for i in 0..3 {
            store.put(None, vec![user("x")], response(&format!("r{i}"), "y"));
        }
        // r0 used: r1 is now the oldest, and goes for r3.
        assert!(store.get("r0").is_some());
        store.put(None, vec![user("x")], response("r3", "y"));
        assert!(store.get("r1").is_none());
        for kept in ["r0", "r2", "r3"] {
            assert!(store.get(kept).is_some(), "{kept}");
        }
        assert!(store.bytes() <= 3 * one + one / 2);
        // One larger than the whole store is not kept, and evicts nothing.
        let huge = "z".repeat(4 * one);
        store.put(None, vec![user(&huge)], response("big", "y"));
        assert!(store.get("big").is_none());
        assert!(store.get("r0").is_some());
        // Storing an id again replaces it.
        store.put(None, vec![user("x")], response("r0", "other"));
        assert_eq!(
            store.get("r0").unwrap()["output"][0]["content"][0]["text"],
            "other"
        );
        assert!(store.bytes() <= 3 * one + one / 2);
    }

    #[test]
    fn a_conversation_is_walked_back_only_so_far() {
        let store = ResponseStore::new(1 << 24);
        store.put(None, vec![user("0")], response("t0", "."));
        for i in 1..=MAX_CONVERSATION_TURNS {
            store.put(
                Some(format!("t{}", i - 1)),
                vec![user("x")],
                response(&format!("t{i}"), "."),
            );
        }
        assert_eq!(
            store
                .conversation(&format!("t{}", MAX_CONVERSATION_TURNS - 1))
                .map(|c| c.len()),
            Ok(2 * MAX_CONVERSATION_TURNS)
        );
        assert_eq!(
            store.conversation(&format!("t{MAX_CONVERSATION_TURNS}")),
            Err(StoreError::TooLong)
        );
    }
}
