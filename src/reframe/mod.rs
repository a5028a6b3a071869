//! Upstream bytes → events → SSE frames.
//!
//! One byte-level state machine per format (`sse`, `ndjson`, `text`), each
//! fed the upstream's chunks as they arrive and bounded by
//! `limits.max_event_bytes`, and a [`Reframer`] that numbers and encodes
//! what they produce.

mod ndjson;
mod sse;
mod text;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;

pub use ndjson::NdjsonDecoder;
pub use sse::SseDecoder;
pub use text::TextDecoder;

use crate::config::Format;
use crate::sse::SseEncoder;

/// One decoded event: an optional name and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: Option<Bytes>,
    pub data: Bytes,
}

/// A line or event went past `limits.max_event_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an upstream line or event is larger than limits.max_event_bytes ({0} bytes)")]
pub struct TooLarge(pub usize);

/// A concrete format decoder.
#[derive(Debug)]
pub enum Decoder {
    Sse(SseDecoder),
    Ndjson(NdjsonDecoder),
    Text(TextDecoder),
}

/// The format actually used for one response (never `Auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Sse,
    Ndjson,
    Text,
}

/// The media types read as NDJSON when `format = "auto"`.
const NDJSON_TYPES: [&str; 5] = [
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-seq",
];

impl Wire {
    /// Picks the format: the route's when set, else from the content type.
    pub fn choose(format: Format, headers: &HeaderMap) -> Wire {
        match format {
            Format::Sse => Wire::Sse,
            Format::Ndjson => Wire::Ndjson,
            Format::Text => Wire::Text,
            // Compared without case, in place (no lowercase copy).
            Format::Auto => match crate::proxy::media_type(headers) {
                Some(t) if t.eq_ignore_ascii_case("text/event-stream") => Wire::Sse,
                Some(t) if NDJSON_TYPES.iter().any(|n| t.eq_ignore_ascii_case(n)) => Wire::Ndjson,
                _ => Wire::Text,
            },
        }
    }
}

impl Decoder {
    /// A decoder for `wire` with the given bound.
    pub fn new(wire: Wire, max: usize) -> Decoder {
        match wire {
            Wire::Sse => Decoder::Sse(SseDecoder::new(max)),
            Wire::Ndjson => Decoder::Ndjson(NdjsonDecoder::new(max)),
            Wire::Text => Decoder::Text(TextDecoder::new(max)),
        }
    }

    /// The next complete event in `buf`, consuming its bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        match self {
            Decoder::Sse(d) => d.decode(buf),
            Decoder::Ndjson(d) => d.decode(buf),
            Decoder::Text(d) => d.decode(buf),
        }
    }

    /// Like `decode`, at the end of the upstream body.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        match self {
            Decoder::Sse(d) => d.decode_eof(buf),
            Decoder::Ndjson(d) => d.decode_eof(buf),
            Decoder::Text(d) => d.decode_eof(buf),
        }
    }
}

/// Decoder + encoder: upstream chunks in, numbered SSE frames out.
#[derive(Debug)]
pub struct Reframer {
    decoder: Decoder,
    encoder: SseEncoder,
    /// Bytes carried over from earlier chunks (an event cut in two).
    buf: BytesMut,
    /// The newest chunk while `buf` is empty: one-line SSE events are
    /// encoded straight from it, without a copy into `buf`.
    chunk: Bytes,
    eof: bool,
}

impl Reframer {
    /// A reframer for one stream.
    pub fn new(wire: Wire, max_event_bytes: usize) -> Reframer {
        Reframer {
            decoder: Decoder::new(wire, max_event_bytes),
            encoder: SseEncoder::new(),
            buf: BytesMut::new(),
            chunk: Bytes::new(),
            eof: false,
        }
    }

    /// Hands the reframer the next upstream chunk.
    pub fn feed(&mut self, chunk: Bytes) {
        self.spill();
        self.chunk = chunk;
    }

    /// Moves what is left of `chunk` into `buf`, for the general decoders.
    fn spill(&mut self) {
        if !self.chunk.is_empty() {
            self.buf.extend_from_slice(&self.chunk);
        }
        self.chunk = Bytes::new();
    }

    /// Moves the front of `chunk` into `buf`, through its next blank line
    /// (`\n\n`, or all of it): enough to finish the event `buf` holds the
    /// start of, so that the events after it are read from `chunk` itself.
    fn top_up(&mut self) {
        let take = memchr::memmem::find(&self.chunk, b"\n\n").map_or(self.chunk.len(), |i| i + 2);
        self.buf.extend_from_slice(&self.chunk[..take]);
        self.advance_chunk(take);
    }

    fn advance_chunk(&mut self, n: usize) {
        self.chunk.advance(n);
        if self.chunk.is_empty() {
            // Let go of the upstream read buffer, so that it is reused in
            // place for the next read.
            self.chunk = Bytes::new();
        }
    }

    /// Marks the end of the upstream body.
    pub fn feed_eof(&mut self) {
        self.eof = true;
    }

    /// Encodes the next complete event into `out`; returns its id.
    ///
    /// SSE events of the common one-line shape are encoded straight from the
    /// upstream chunk ([`SseDecoder::fast`]); anything else, and an event cut
    /// between two chunks, goes through the general decoder, which sees the
    /// same bytes in the same order.
    pub fn next_event(&mut self, out: &mut BytesMut) -> Result<Option<u64>, TooLarge> {
        let Decoder::Sse(_) = self.decoder else {
            self.spill();
            return self.general(out, self.eof);
        };
        loop {
            if !self.buf.is_empty() {
                let last = self.chunk.is_empty();
                if let Some(id) = self.general(out, last && self.eof)? {
                    return Ok(Some(id));
                }
                if last {
                    return Ok(None);
                }
                self.top_up();
                continue;
            }
            if self.chunk.is_empty() {
                // Nothing new to decode: only the end of the body can
                // complete an event (a last one without its blank line).
                if !self.eof {
                    return Ok(None);
                }
                return self.general(out, true);
            }
            if let Some(id) = self.fast_from_chunk(out) {
                return Ok(Some(id));
            }
            self.top_up();
        }
    }

    /// The next one-line SSE event straight from `chunk`, when nothing is
    /// carried over in `buf` and the chunk starts with one.
    fn fast_from_chunk(&mut self, out: &mut BytesMut) -> Option<u64> {
        let Decoder::Sse(d) = &self.decoder else { return None };
        if !self.buf.is_empty() {
            return None;
        }
        let e = d.fast(&self.chunk)?;
        let id = self.encoder.encode_line(out, e.name.map(|r| &self.chunk[r]), &self.chunk[e.data]);
        self.advance_chunk(e.len);
        Some(id)
    }

    /// Encodes every complete event into `out`, counting them in `events`:
    /// [`next_event`](Reframer::next_event) in a loop, one-line SSE events
    /// first in a tight loop over the chunk.
    pub fn drain(&mut self, out: &mut BytesMut, events: &mut u64) -> Result<(), TooLarge> {
        loop {
            while self.fast_from_chunk(out).is_some() {
                *events += 1;
            }
            match self.next_event(out)? {
                Some(_) => *events += 1,
                None => return Ok(()),
            }
        }
    }

    /// The general decoder over `buf`.
    fn general(&mut self, out: &mut BytesMut, eof: bool) -> Result<Option<u64>, TooLarge> {
        let event = if eof { self.decoder.decode_eof(&mut self.buf)? } else { self.decoder.decode(&mut self.buf)? };
        Ok(event.map(|e| self.encoder.encode(out, e.name.as_deref(), &e.data)))
    }

    /// Encodes an event the proxy itself adds (`end`, `error`); returns its id.
    pub fn push(&mut self, out: &mut BytesMut, name: &[u8], data: &[u8]) -> u64 {
        self.encoder.encode(out, Some(name), data)
    }

    /// The id of the last event encoded.
    pub fn last_id(&self) -> u64 {
        self.encoder.last_id()
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Feeds `input` cut at `cuts` and returns every event, or the error.
    pub fn run(wire: Wire, max: usize, input: &[u8], cuts: &[usize]) -> (Vec<Event>, Option<TooLarge>) {
        let mut d = Decoder::new(wire, max);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c > 0 && *c < input.len()).collect();
        bounds.sort_unstable();
        bounds.dedup();
        bounds.push(input.len());
        for end in bounds {
            buf.extend_from_slice(&input[start..end]);
            start = end;
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
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
        (events, None)
    }

    /// Asserts that every single cut point and byte-at-a-time give the same
    /// events as the whole input in one piece.
    pub fn assert_split_invariant(wire: Wire, max: usize, input: &[u8]) -> (Vec<Event>, Option<TooLarge>) {
        let whole = run(wire, max, input, &[]);
        for cut in 1..input.len() {
            assert_eq!(run(wire, max, input, &[cut]), whole, "cut at {cut} of {:?}", String::from_utf8_lossy(input));
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(wire, max, input, &every), whole, "byte at a time");
        whole
    }

    pub fn ev(name: Option<&str>, data: &str) -> Event {
        Event {
            name: name.map(|n| Bytes::copy_from_slice(n.as_bytes())),
            data: Bytes::copy_from_slice(data.as_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(content_type: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
        h
    }

    #[test]
    fn auto_reads_the_content_type_in_any_case_and_a_route_format_wins() {
        assert_eq!(Wire::choose(Format::Auto, &typed("TEXT/Event-Stream")), Wire::Sse);
        assert_eq!(Wire::choose(Format::Auto, &typed("text/event-stream; charset=utf-8")), Wire::Sse);
        assert_eq!(Wire::choose(Format::Auto, &typed("Application/X-NDJSON; charset=utf-8")), Wire::Ndjson);
        for t in NDJSON_TYPES {
            assert_eq!(Wire::choose(Format::Auto, &typed(t)), Wire::Ndjson, "{t}");
        }
        assert_eq!(Wire::choose(Format::Auto, &typed("application/json")), Wire::Text);
        assert_eq!(Wire::choose(Format::Auto, &HeaderMap::new()), Wire::Text);
        let sse = typed("text/event-stream");
        assert_eq!(Wire::choose(Format::Sse, &typed("text/plain")), Wire::Sse);
        assert_eq!(Wire::choose(Format::Ndjson, &sse), Wire::Ndjson);
        assert_eq!(Wire::choose(Format::Text, &sse), Wire::Text);
    }
}
