#![no_main]
//! The config loader never panics: any text is a config or an error that
//! names a key.

use libfuzzer_sys::fuzz_target;
use ssegate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::parse(text, "fuzz.toml", std::path::Path::new("/nonexistent")) {
        assert!(!e.key.is_empty());
        let _ = e.to_string();
    }
});
