#![no_main]
//! The text decoder never panics, always yields valid UTF-8, and the text
//! it yields is the same however its input is cut (when nothing is over
//! the bound).

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use ssegate::reframe::Wire;

fuzz_target!(|data: &[u8]| {
    let Some((chunk, _max, body)) = common::split(data) else { return };
    let join = |events: &[ssegate::reframe::Event]| {
        let mut out = Vec::new();
        for e in events {
            assert!(std::str::from_utf8(&e.data).is_ok(), "event is not UTF-8");
            out.extend_from_slice(&e.data);
        }
        out
    };
    let (whole, err_whole) = common::decode(Wire::Text, 1 << 20, body, 0);
    let (cut, err_cut) = common::decode(Wire::Text, 1 << 20, body, chunk);
    assert!(err_whole.is_none() && err_cut.is_none());
    assert_eq!(join(&whole), join(&cut));
    assert_eq!(join(&whole), String::from_utf8_lossy(body).as_bytes());
});
