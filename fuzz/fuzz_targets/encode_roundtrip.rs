#![no_main]
//! Events written by the encoder and read back by an independent SSE parser
//! (the `eventsource-stream` crate) come back the same: no payload byte can
//! forge a field or an event.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use eventsource_stream::Eventsource;
use libfuzzer_sys::fuzz_target;
use ssegate::sse::SseEncoder;

fuzz_target!(|data: &[u8]| {
    // Events separated by 0x00; an event may start with a name before 0x01.
    // The payload is text: EventSource delivers UTF-8 (lossy), so do we.
    let text = String::from_utf8_lossy(data);
    let mut encoder = SseEncoder::new();
    let mut out = BytesMut::new();
    let mut expected = Vec::new();
    for part in text.split('\0') {
        let (name, payload) = match part.split_once('\u{1}') {
            Some((n, p)) if !n.is_empty() && !n.contains(['\r', '\n']) => (Some(n), p),
            _ => (None, part),
        };
        let id = encoder.encode(&mut out, name.map(str::as_bytes), payload.as_bytes());
        // The reader joins data lines with LF: CR and CRLF become LF.
        let normalized = payload.replace("\r\n", "\n").replace('\r', "\n");
        expected.push((id.to_string(), name.unwrap_or("message").to_string(), normalized));
    }
    let body = futures::stream::iter([Ok::<Bytes, std::convert::Infallible>(out.freeze())]);
    let parsed: Vec<_> = futures::executor::block_on(body.eventsource().collect::<Vec<_>>());
    let got: Vec<(String, String, String)> = parsed
        .into_iter()
        .map(|e| e.expect("parse error"))
        .map(|e| (e.id, e.event, e.data))
        .collect();
    assert_eq!(got, expected);
});
