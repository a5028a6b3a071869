//! The SSE encoder: events written straight into a `BytesMut`, payload split
//! on CR, LF and CRLF so no upstream byte can forge a field or an event.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

/// The keep-alive frame: a comment line.
pub const KEEPALIVE: Bytes = Bytes::from_static(b":\n\n");

/// The comment that opens a handoff stream so `onopen` fires at once.
pub const OPEN_COMMENT: &[u8] = b": ok\n\n";

/// Numbers events 1, 2, 3 … and writes them.
#[derive(Debug, Default)]
pub struct SseEncoder {
    id: EventId,
}

impl SseEncoder {
    /// A new encoder whose first event gets id 1.
    pub fn new() -> SseEncoder {
        SseEncoder { id: EventId::default() }
    }

    /// The id of the last event written (0 before the first).
    pub fn last_id(&self) -> u64 {
        self.id.value
    }

    /// Writes one event with the next id; returns that id.
    pub fn encode(&mut self, out: &mut BytesMut, name: Option<&[u8]>, data: &[u8]) -> u64 {
        self.id.increment();
        write_event_with(out, self.id.digits(), name, data);
        self.id.value
    }

    /// Like [`encode`](SseEncoder::encode) for a name and data without CR or
    /// LF (the caller knows): nothing is scanned, and an unnamed event is
    /// three copies (the `id:` line and `data: ` kept ready, the data, LF LF).
    pub fn encode_line(&mut self, out: &mut BytesMut, name: Option<&[u8]>, data: &[u8]) -> u64 {
        self.id.increment();
        match name {
            None => {
                let head = self.id.id_and_data();
                out.reserve(head.len() + data.len() + 2);
                out.extend_from_slice(head);
            }
            Some(name) => {
                let line = self.id.id_line();
                out.reserve(line.len() + 8 + name.len() + 7 + data.len() + 2);
                out.extend_from_slice(line);
                out.extend_from_slice(b"event: ");
                out.extend_from_slice(name);
                out.extend_from_slice(b"\ndata: ");
            }
        }
        out.extend_from_slice(data);
        out.extend_from_slice(b"\n\n");
        self.id.value
    }
}

/// Where an id's digits end in [`EventId`]'s buffer; `id: ` is in front of
/// the first digit and `\ndata: ` follows the last.
const DIGITS_END: usize = 24;

/// An event id and its decimal digits, counted up in place: the next id
/// costs a digit or two, not a number formatted anew. The digits sit in
/// `id: …\ndata: `, so an event's head is one copy.
#[derive(Debug)]
struct EventId {
    value: u64,
    ascii: [u8; DIGITS_END + 7],
    /// Where the digits start in `ascii` (4 at the least: u64 has at most 20).
    start: usize,
}

impl Default for EventId {
    fn default() -> EventId {
        let mut ascii = [b'0'; DIGITS_END + 7];
        ascii[DIGITS_END..].copy_from_slice(b"\ndata: ");
        ascii[DIGITS_END - 5..DIGITS_END - 1].copy_from_slice(b"id: ");
        EventId { value: 0, ascii, start: DIGITS_END - 1 }
    }
}

impl EventId {
    fn increment(&mut self) {
        self.value += 1;
        let mut i = DIGITS_END - 1;
        loop {
            if self.ascii[i] != b'9' {
                self.ascii[i] += 1;
                return;
            }
            self.ascii[i] = b'0';
            if i == self.start {
                // 9…9 + 1: one more digit, and `id: ` moves one to the left.
                self.start -= 1;
                self.ascii[self.start] = b'1';
                self.ascii[self.start - 4..self.start].copy_from_slice(b"id: ");
                return;
            }
            i -= 1;
        }
    }

    fn digits(&self) -> &[u8] {
        &self.ascii[self.start..DIGITS_END]
    }

    /// `id: N\n`.
    fn id_line(&self) -> &[u8] {
        &self.ascii[self.start - 4..DIGITS_END + 1]
    }

    /// `id: N\ndata: `.
    fn id_and_data(&self) -> &[u8] {
        &self.ascii[self.start - 4..]
    }
}

/// Writes `id:`, `event:` when named, and one `data:` line per payload line.
pub fn write_event(out: &mut BytesMut, id: u64, name: Option<&[u8]>, data: &[u8]) {
    write_event_with(out, itoa::Buffer::new().format(id).as_bytes(), name, data);
}

fn write_event_with(out: &mut BytesMut, id: &[u8], name: Option<&[u8]>, data: &[u8]) {
    out.reserve(16 + id.len() + name.map_or(0, |n| n.len() + 8) + data.len() + 8);
    out.put_slice(b"id: ");
    out.put_slice(id);
    out.put_u8(b'\n');
    if let Some(name) = name {
        out.put_slice(b"event: ");
        // A name is one line by construction; cut it at a line end if not.
        let end = memchr::memchr2(b'\r', b'\n', name).unwrap_or(name.len());
        out.put_slice(&name[..end]);
        out.put_u8(b'\n');
    }
    let mut rest = data;
    loop {
        out.put_slice(b"data: ");
        match memchr::memchr2(b'\r', b'\n', rest) {
            Some(i) => {
                out.put_slice(&rest[..i]);
                out.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.put_slice(rest);
                out.put_u8(b'\n');
                break;
            }
        }
    }
    out.put_u8(b'\n');
}

/// Writes an event without an `id:` line, so that it does not move the
/// client's Last-Event-ID (used for `replay_gap`).
pub fn write_unnumbered(out: &mut BytesMut, name: &[u8], data: &[u8]) {
    let mut event = BytesMut::new();
    write_event(&mut event, 0, Some(name), data);
    // Drop the "id: 0\n" line write_event starts with.
    out.extend_from_slice(&event[b"id: 0\n".len()..]);
}

/// Writes the `retry:` field that tells EventSource how long to wait.
pub fn write_retry(out: &mut BytesMut, retry: Duration) {
    let mut itoa = itoa::Buffer::new();
    out.put_slice(b"retry: ");
    out.put_slice(itoa.format(retry.as_millis()).as_bytes());
    out.put_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(name: Option<&str>, data: &str) -> String {
        let mut out = BytesMut::new();
        let mut e = SseEncoder::new();
        e.encode(&mut out, None, b"x");
        out.clear();
        e.encode(&mut out, name.map(str::as_bytes), data.as_bytes());
        // Invalid UTF-8 would show up as U+FFFD and fail the comparison.
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn ids_count_up_in_decimal_across_every_carry() {
        let mut id = EventId::default();
        for n in 1..=100_500u64 {
            id.increment();
            assert_eq!(id.digits(), n.to_string().as_bytes());
        }
        assert_eq!(id.id_and_data(), b"id: 100500\ndata: ");
        let mut big = EventId::default();
        big.ascii[5..DIGITS_END].fill(b'9');
        big.start = 5;
        big.increment();
        assert_eq!(big.digits(), b"10000000000000000000");
        assert_eq!(big.id_line(), b"id: 10000000000000000000\n");
    }

    #[test]
    fn plain_event() {
        assert_eq!(enc(None, "hello"), "id: 2\ndata: hello\n\n");
    }

    #[test]
    fn named_event() {
        assert_eq!(enc(Some("end"), "{}"), "id: 2\nevent: end\ndata: {}\n\n");
    }

    #[test]
    fn empty_data() {
        assert_eq!(enc(None, ""), "id: 2\ndata: \n\n");
    }

    #[test]
    fn every_line_ending_splits() {
        assert_eq!(enc(None, "a\nb\rc\r\nd"), "id: 2\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
        assert_eq!(enc(None, "a\n"), "id: 2\ndata: a\ndata: \n\n");
        assert_eq!(enc(None, "\r\n\r\n"), "id: 2\ndata: \ndata: \ndata: \n\n");
        assert_eq!(enc(None, "\n\nid: 9\nevent: x"), "id: 2\ndata: \ndata: \ndata: id: 9\ndata: event: x\n\n");
    }

    #[test]
    fn name_cannot_forge_a_field() {
        assert_eq!(enc(Some("a\ndata: x"), "y"), "id: 2\nevent: a\ndata: y\n\n");
    }

    #[test]
    fn retry_field() {
        let mut out = BytesMut::new();
        write_retry(&mut out, Duration::from_secs(2));
        assert_eq!(&out[..], b"retry: 2000\n\n");
    }
}
