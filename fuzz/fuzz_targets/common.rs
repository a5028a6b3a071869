//! Shared by the decoder targets: the input's first byte picks the chunk
//! size, so every target also explores where chunk boundaries fall.

use bytes::BytesMut;
use ssegate::reframe::{Decoder, Event, TooLarge, Wire};

/// Feeds `input` to a fresh decoder in chunks of `chunk` bytes (whole when 0).
pub fn decode(wire: Wire, max: usize, input: &[u8], chunk: usize) -> (Vec<Event>, Option<TooLarge>) {
    let mut d = Decoder::new(wire, max);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    let size = if chunk == 0 { input.len().max(1) } else { chunk };
    for piece in input.chunks(size) {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(e)) => events.push(e),
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
    }
    loop {
        match d.decode_eof(&mut buf) {
            Ok(Some(e)) => events.push(e),
            Ok(None) => return (events, None),
            Err(e) => return (events, Some(e)),
        }
    }
}

/// Splits the fuzz input into (chunk size, max event bytes, body).
pub fn split(data: &[u8]) -> Option<(usize, usize, &[u8])> {
    let (&a, rest) = data.split_first()?;
    let (&b, body) = rest.split_first()?;
    Some((a as usize % 17, 8 + (b as usize) * 8, body))
}
