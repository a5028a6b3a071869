//! The WHATWG event-stream parser as a byte-level state machine.
//!
//! Lines end in CR, LF or CRLF, also when the CR ends one chunk and the LF
//! starts the next. `data` lines are joined with LF; `event` names the
//! event; comments, `id` and `retry` are dropped (the proxy sends its own);
//! an empty line dispatches. An event that is not finished when the body
//! ends is discarded, as the WHATWG rules say.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Event, TooLarge};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Where the parts of a one-line event are, from [`SseDecoder::fast`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Simple {
    pub name: Option<std::ops::Range<usize>>,
    pub data: std::ops::Range<usize>,
    /// Bytes the event takes, its blank line included.
    pub len: usize,
}

/// Where a field's value starts: after the colon at `colon_end` and one space.
fn value_start(line: &[u8], colon_end: usize) -> usize {
    if line.get(colon_end) == Some(&b' ') {
        colon_end + 1
    } else {
        colon_end
    }
}

/// Upstream SSE → events.
#[derive(Debug)]
pub struct SseDecoder {
    max: usize,
    /// Bytes of `buf` already scanned for a line end, so none is scanned twice.
    next_index: usize,
    /// The previous line ended in CR: an LF that follows belongs to it.
    after_cr: bool,
    /// Whether the start of the stream (and a BOM there) was dealt with.
    started: bool,
    name: Option<Bytes>,
    /// The first `data` value; most events have one, and it costs no copy.
    data: Option<Bytes>,
    /// Further `data` values joined with LF, only for multi-line events.
    joined: BytesMut,
    size: usize,
}

impl SseDecoder {
    /// A decoder with lines and events bounded by `max` bytes.
    pub fn new(max: usize) -> SseDecoder {
        SseDecoder {
            max,
            next_index: 0,
            after_cr: false,
            started: false,
            name: None,
            data: None,
            joined: BytesMut::new(),
            size: 0,
        }
    }

    /// The next event dispatched by the lines in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        if !self.started {
            let n = buf.len().min(BOM.len());
            if buf[..n] != BOM[..n] {
                self.started = true;
            } else if n == BOM.len() {
                buf.advance(BOM.len());
                self.started = true;
            } else {
                return Ok(None);
            }
        }
        loop {
            if self.after_cr && !buf.is_empty() {
                if buf[0] == b'\n' {
                    buf.advance(1);
                }
                self.after_cr = false;
            }
            let Some(offset) = memchr::memchr2(b'\r', b'\n', &buf[self.next_index..]) else {
                self.next_index = buf.len();
                if buf.len() > self.max {
                    return Err(TooLarge(self.max));
                }
                return Ok(None);
            };
            let end = self.next_index + offset;
            self.next_index = 0;
            if end > self.max {
                self.reset();
                return Err(TooLarge(self.max));
            }
            let line = buf.split_to(end).freeze();
            if buf[0] == b'\r' {
                self.after_cr = true;
            }
            buf.advance(1);
            if let Some(event) = self.line(line)? {
                return Ok(Some(event));
            }
        }
    }

    /// The common shape, `[event: NAME LF] data: DATA LF LF`, at the start of
    /// `s` while no event is half read: the name and data ranges in `s` and
    /// how many bytes the event takes. Anything else (CR, comments, several
    /// data lines, a bound reached) is `None` and goes through [`decode`],
    /// which gives the same events; this only skips its per-line bookkeeping.
    ///
    /// [`decode`]: SseDecoder::decode
    pub fn fast(&self, s: &[u8]) -> Option<Simple> {
        if !self.started
            || self.after_cr
            || self.next_index != 0
            || self.name.is_some()
            || self.data.is_some()
            || !self.joined.is_empty()
        {
            return None;
        }
        let (name, start) = if s.starts_with(b"event:") {
            let end = memchr::memchr2(b'\r', b'\n', s)?;
            if s[end] != b'\n' || end > self.max {
                return None;
            }
            let value = value_start(s, 6)..end;
            (if value.is_empty() { None } else { Some(value) }, end + 1)
        } else {
            (None, 0)
        };
        let rest = &s[start..];
        if !rest.starts_with(b"data:") {
            return None;
        }
        let end = memchr::memchr2(b'\r', b'\n', rest)?;
        if rest[end] != b'\n' || rest.get(end + 1) != Some(&b'\n') || end > self.max {
            return None;
        }
        let data = start + value_start(rest, 5)..start + end;
        if data.len() + 1 > self.max {
            return None;
        }
        Some(Simple { name, data, len: start + end + 2 })
    }

    /// At the end of the body: only events already complete in `buf`.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        if !self.started && buf.len() < BOM.len() {
            self.started = true;
        }
        self.decode(buf)
    }

    fn line(&mut self, line: Bytes) -> Result<Option<Event>, TooLarge> {
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let (field, value) = match memchr::memchr(b':', &line) {
            Some(i) => {
                let start = if line.get(i + 1) == Some(&b' ') { i + 2 } else { i + 1 };
                (line.slice(..i), line.slice(start..))
            }
            None => (line.clone(), Bytes::new()),
        };
        match &field[..] {
            b"data" => self.push_data(value)?,
            b"event" => self.name = (!value.is_empty()).then_some(value),
            _ => {}
        }
        Ok(None)
    }

    fn push_data(&mut self, value: Bytes) -> Result<(), TooLarge> {
        self.size += value.len() + 1;
        if self.size > self.max {
            self.reset();
            return Err(TooLarge(self.max));
        }
        match &self.data {
            None => self.data = Some(value),
            Some(first) => {
                if self.joined.is_empty() {
                    self.joined.reserve(first.len() + 1 + value.len());
                    self.joined.put_slice(first);
                }
                self.joined.put_u8(b'\n');
                self.joined.put_slice(&value);
            }
        }
        Ok(())
    }

    fn dispatch(&mut self) -> Option<Event> {
        let name = self.name.take();
        let first = self.data.take()?;
        let data = if self.joined.is_empty() { first } else { self.joined.split().freeze() };
        self.size = 0;
        Some(Event { name, data })
    }

    fn reset(&mut self) {
        self.name = None;
        self.data = None;
        self.joined.clear();
        self.size = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_split_invariant, ev};
    use super::super::Wire;

    fn events(input: &str) -> Vec<super::Event> {
        let (events, err) = assert_split_invariant(Wire::Sse, 1 << 20, input.as_bytes());
        assert_eq!(err, None);
        events
    }

    #[test]
    fn openai_style() {
        let input = "data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n";
        assert_eq!(events(input), vec![ev(None, "{\"a\":1}"), ev(None, "{\"a\":2}"), ev(None, "[DONE]")]);
    }

    #[test]
    fn anthropic_style_named_events() {
        let input = "event: message_start\ndata: {}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(
            events(input),
            vec![
                ev(Some("message_start"), "{}"),
                ev(Some("ping"), "{\"type\": \"ping\"}"),
                ev(Some("message_stop"), "{\"type\":\"message_stop\"}")
            ]
        );
    }

    #[test]
    fn every_line_ending_and_multiline_data() {
        let input = "data: a\r\ndata: b\rdata:c\n\r\ndata:  two spaces\r\rdata\n\n";
        assert_eq!(events(input), vec![ev(None, "a\nb\nc"), ev(None, " two spaces"), ev(None, "")]);
    }

    #[test]
    fn comments_id_retry_dropped_and_bom_skipped() {
        let input = "\u{FEFF}: hi\nid: 7\nretry: 10\nevent: x\ndata: 1\n\n:\n\nid: 8\n\n";
        assert_eq!(events(input), vec![ev(Some("x"), "1")]);
    }

    #[test]
    fn only_first_bom_is_skipped_and_unfinished_event_discarded() {
        let input = "\u{FEFF}data: a\n\n\u{FEFF}data: b\n\ndata: never";
        assert_eq!(events(input), vec![ev(None, "a")]);
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        assert_eq!(events("event: x\n\ndata: y\n\n"), vec![ev(None, "y")]);
    }

    #[test]
    fn oversized_line_and_event() {
        let (ev1, err) = assert_split_invariant(Wire::Sse, 16, b"data: ok\n\ndata: 0123456789abcdefgh\n\n");
        assert_eq!((ev1.len(), err.is_some()), (1, true));
        let (ev2, err) = assert_split_invariant(Wire::Sse, 16, b"data: 0123456789\ndata: 0123456789\n\n");
        assert_eq!((ev2.len(), err.is_some()), (0, true));
    }
}
