//! Raw text: each piece of body data as it is read is one event, never held
//! back waiting for more. A UTF-8 sequence cut by a chunk boundary is held
//! until whole; invalid UTF-8 becomes U+FFFD.

use bytes::{Bytes, BytesMut};

use super::{Event, TooLarge};

/// Upstream text → events.
#[derive(Debug)]
pub struct TextDecoder {
    max: usize,
}

impl TextDecoder {
    /// A decoder with events bounded by `max` bytes.
    pub fn new(max: usize) -> TextDecoder {
        TextDecoder { max }
    }

    /// Everything in `buf` but an unfinished UTF-8 sequence at its end.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        let keep = incomplete_tail(buf);
        self.take(buf, buf.len() - keep)
    }

    /// Everything in `buf`; an unfinished sequence becomes U+FFFD.
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, TooLarge> {
        self.take(buf, buf.len())
    }

    fn take(&mut self, buf: &mut BytesMut, n: usize) -> Result<Option<Event>, TooLarge> {
        if n == 0 {
            return Ok(None);
        }
        if n > self.max {
            return Err(TooLarge(self.max));
        }
        let raw = buf.split_to(n).freeze();
        let data = match String::from_utf8_lossy(&raw) {
            std::borrow::Cow::Borrowed(_) => raw,
            std::borrow::Cow::Owned(fixed) => Bytes::from(fixed),
        };
        Ok(Some(Event { name: None, data }))
    }
}

/// How many bytes at the end of `buf` start a UTF-8 sequence that is not
/// yet complete (0 to 3).
fn incomplete_tail(buf: &[u8]) -> usize {
    let len = buf.len();
    for back in 1..=len.min(3) {
        let b = buf[len - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back
        }
        let need = match b {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0, // ASCII or invalid lead: nothing to wait for
        };
        return if need > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::super::testing::run;
    use super::super::Wire;

    fn joined(input: &[u8], cuts: &[usize]) -> String {
        let (events, err) = run(Wire::Text, 1 << 20, input, cuts);
        assert_eq!(err, None);
        let mut out = String::new();
        for e in events {
            match std::str::from_utf8(&e.data) {
                Ok(text) => out.push_str(text),
                Err(err) => panic!("an event is not UTF-8: {err}"),
            }
        }
        out
    }

    #[test]
    fn utf8_cut_anywhere_is_whole() {
        let input = "héllo wörld — 你好 🎉!".as_bytes();
        for cut in 0..input.len() {
            assert_eq!(joined(input, &[cut]), "héllo wörld — 你好 🎉!");
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(joined(input, &every), "héllo wörld — 你好 🎉!");
    }

    #[test]
    fn each_chunk_is_one_event() {
        let (events, _) = run(Wire::Text, 1 << 20, b"Hello, world", &[5]);
        assert_eq!(events.len(), 2);
        assert_eq!(&events[0].data[..], b"Hello");
    }

    #[test]
    fn invalid_utf8_becomes_replacement() {
        assert_eq!(joined(b"a\xFFb\xC3", &[]), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(joined(b"a\xF0\x9F", &[2]), "a\u{FFFD}");
    }
}
