//! NDJSON: each non-empty line is one event whose data is that line,
//! untouched. Lines end in LF; a CR before it is part of the line ending.

use bytes::{Buf, BytesMut};

use super::{Event, TooLarge};

/// Upstream NDJSON → events.
#[derive(Debug)]
pub struct NdjsonDecoder {
    max: usize,
    /// Bytes of `buf` already scanned for LF, so none is scanned twice.
    next_index: usize,
}

impl NdjsonDecoder {
    /// A decoder with lines bounded by `max` bytes.
    pub fn new(max: usize) -> NdjsonDecoder {
        NdjsonDecoder { max, next_index: 0 }
    }

    /// The next non-empty line in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        loop {
            let Some(offset) = memchr::memchr(b'\n', &buf[self.next_index..]) else {
                self.next_index = buf.len();
                if buf.len() > self.max + 1 || (buf.len() > self.max && buf.last() != Some(&b'\r')) {
                    return Err(TooLarge(self.max));
                }
                return Ok(None);
            };
            let end = self.next_index + offset;
            self.next_index = 0;
            let mut line = buf.split_to(end);
            buf.advance(1);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if line.len() > self.max {
                return Err(TooLarge(self.max));
            }
            if !line.is_empty() {
                return Ok(Some(Event { name: None, data: line.freeze() }));
            }
        }
    }

    /// Like `decode`; a last line without LF is an event too.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        if let Some(event) = self.decode(buf)? {
            return Ok(Some(event));
        }
        self.next_index = 0;
        let mut line = buf.split();
        if line.last() == Some(&b'\r') {
            line.truncate(line.len() - 1);
        }
        Ok((!line.is_empty()).then(|| Event { name: None, data: line.freeze() }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_split_invariant, ev};
    use super::super::Wire;

    #[test]
    fn ollama_style_lines() {
        let input = "{\"response\":\"Hel\",\"done\":false}\n{\"response\":\"lo\",\"done\":false}\r\n\n{\"done\":true}";
        let (events, err) = assert_split_invariant(Wire::Ndjson, 1 << 20, input.as_bytes());
        assert_eq!(err, None);
        assert_eq!(
            events,
            vec![
                ev(None, "{\"response\":\"Hel\",\"done\":false}"),
                ev(None, "{\"response\":\"lo\",\"done\":false}"),
                ev(None, "{\"done\":true}")
            ]
        );
    }

    #[test]
    fn data_untouched_including_lone_cr() {
        let (events, _) = assert_split_invariant(Wire::Ndjson, 1 << 20, b"a\rb\n  \n");
        assert_eq!(events, vec![ev(None, "a\rb"), ev(None, "  ")]);
    }

    #[test]
    fn oversized_line() {
        let (events, err) = assert_split_invariant(Wire::Ndjson, 4, b"1234\r\nabcde\n");
        assert_eq!(events, vec![ev(None, "1234")]);
        assert!(err.is_some());
    }
}
