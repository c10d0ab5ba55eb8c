//! The prompt's byte bound, checked before any tokenizer call, on routers and gateways alike.

use crate::error::RouterError;

/// Refuses a text of `bytes` bytes over `limit` (`--max-prompt-bytes`), naming `field`. Cheap:
/// it runs before any tokenizer call.
pub fn check_prompt_bytes(
    bytes: usize,
    limit: usize,
    field: &'static str,
) -> Result<(), RouterError> {
    if bytes > limit {
        return Err(RouterError::invalid(
            field,
            format!("{field} is {bytes} bytes; the limit is {limit} bytes (--max-prompt-bytes)"),
        ));
    }
    Ok(())
}
