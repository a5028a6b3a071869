#![no_main]
//! The SSE decoder never panics, gives the same events however its input is
//! cut, and never yields data or a name beyond the bound.

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use ssegate::reframe::Wire;

fuzz_target!(|data: &[u8]| {
    let Some((chunk, max, body)) = common::split(data) else { return };
    let whole = common::decode(Wire::Sse, max, body, 0);
    let cut = common::decode(Wire::Sse, max, body, chunk);
    assert_eq!(whole, cut, "events depend on where the input was cut");
    for e in &whole.0 {
        assert!(e.data.len() <= max, "event over the bound");
        if let Some(name) = &e.name {
            assert!(!name.contains(&b'\n') && !name.contains(&b'\r'));
        }
    }
});
