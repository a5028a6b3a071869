#![no_main]
//! The NDJSON decoder never panics, gives the same events however its input
//! is cut, and every event is a non-empty line of the input, untouched.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use ssegate::reframe::Wire;

fuzz_target!(|data: &[u8]| {
    let Some((chunk, max, body)) = common::split(data) else { return };
    let whole = common::decode(Wire::Ndjson, max, body, 0);
    let cut = common::decode(Wire::Ndjson, max, body, chunk);
    assert_eq!(whole, cut, "events depend on where the input was cut");
    for e in &whole.0 {
        assert!(!e.data.is_empty() && !e.data.contains(&b'\n') && e.data.len() <= max);
    }
});
