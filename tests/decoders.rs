//! Property tests for the public decoders and the SSE encoder.
//!
//! The decoders see upstream bytes in whatever pieces the network hands
//! over, so the one property that matters most is that the pieces do not
//! matter: feeding an input chunk by chunk (draining `decode` after each
//! chunk, then `decode_eof`) gives exactly what the whole input gives. The
//! inputs are built from the tokens that make decoders go wrong: CR, LF,
//! CRLF, `:`, field names, multibyte UTF-8, a BOM, invalid bytes.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use ssegate::reframe::{Decoder, Event, Reframer, TooLarge, Wire};
use ssegate::sse::SseEncoder;

/// Large enough that no generated input reaches it.
const BIG: usize = 1 << 20;

/// What one run of a decoder produced: its events and the error it stopped on.
type Outcome = (Vec<Event>, Option<TooLarge>);

/// Drains `decode` (or `decode_eof`) until it has nothing more.
fn drain(d: &mut Decoder, buf: &mut BytesMut, eof: bool, events: &mut Vec<Event>) -> Result<(), TooLarge> {
    loop {
        let next = if eof { d.decode_eof(buf)? } else { d.decode(buf)? };
        match next {
            Some(e) => events.push(e),
            None => return Ok(()),
        }
    }
}

/// Feeds `input` cut at `cuts` (any order, duplicates and out-of-range
/// offsets ignored) and returns every event, and the error if one ended it.
fn run(wire: Wire, max: usize, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut d = Decoder::new(wire, max);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for chunk in pieces(input, cuts) {
        buf.extend_from_slice(chunk);
        if let Err(e) = drain(&mut d, &mut buf, false, &mut events) {
            return (events, Some(e));
        }
    }
    let err = drain(&mut d, &mut buf, true, &mut events).err();
    (events, err)
}

/// `input` cut at `cuts`, as the non-empty chunks a socket would deliver.
fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c > 0 && *c < input.len()).collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(input.len());
    let mut start = 0;
    let mut out = Vec::new();
    for end in bounds {
        if end > start {
            out.push(&input[start..end]);
        }
        start = end;
    }
    out
}

fn every_byte(input: &[u8]) -> Vec<usize> {
    (1..input.len()).collect()
}

// ---------------------------------------------------------------------------
// Input generators
// ---------------------------------------------------------------------------

/// Tokens of an event stream, weighted towards the ones that matter.
fn sse_token() -> impl Strategy<Value = Vec<u8>> {
    let fixed: Vec<&'static [u8]> = vec![
        b"\r",
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\r\n\r\n",
        b"\r\r",
        b":",
        b": ",
        b" ",
        b"data",
        b"data:",
        b"data: ",
        b"event",
        b"event:",
        b"event: ",
        b"id: 7",
        b"retry: 100",
        b"\xEF\xBB\xBF",
        b"\xEF\xBB",
        "é".as_bytes(),
        "你好".as_bytes(),
        "🎉".as_bytes(),
        b"\xF0\x9F",
        b"\xFF",
        b"{\"a\":1}",
        b"[DONE]",
    ];
    prop_oneof![
        6 => prop::sample::select(fixed).prop_map(<[u8]>::to_vec),
        2 => "[a-z0-9 ]{1,6}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ]
}

/// A random event-stream-like input, up to a few hundred bytes.
fn sse_input() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(sse_token(), 0..48).prop_map(|t| t.concat())
}

/// An event stream as model servers write it, one-line events with and
/// without names and spaces, mixed with the odd token of [`sse_token`].
fn sse_events_input() -> impl Strategy<Value = Vec<u8>> {
    let event = prop_oneof![
        4 => "[a-z0-9 {}\":]{0,12}".prop_map(|d| format!("data: {d}\n\n").into_bytes()),
        1 => "[a-z0-9 ]{0,6}".prop_map(|d| format!("data:{d}\n\n").into_bytes()),
        2 => ("[a-z_ ]{0,8}", "[a-z0-9 ]{0,12}").prop_map(|(n, d)| format!("event: {n}\ndata: {d}\n\n").into_bytes()),
        1 => ("[a-z_]{0,8}", "[a-z0-9]{0,12}").prop_map(|(n, d)| format!("event:{n}\ndata:{d}\n\n").into_bytes()),
        1 => sse_token(),
    ];
    prop::collection::vec(event, 0..24).prop_map(|t| t.concat())
}

/// Tokens of an NDJSON body: JSON-ish lines, CR, LF, multibyte text.
fn ndjson_input() -> impl Strategy<Value = Vec<u8>> {
    let fixed: Vec<&'static [u8]> = vec![
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b"{\"response\":\"",
        b"\",\"done\":false}",
        b"{\"done\":true}",
        b":",
        b"data: ",
        "é".as_bytes(),
        "🎉".as_bytes(),
        b"\xEF\xBB\xBF",
        b"\xC3",
    ];
    let token = prop_oneof![
        5 => prop::sample::select(fixed).prop_map(<[u8]>::to_vec),
        2 => "[a-z ]{1,6}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ];
    prop::collection::vec(token, 0..48).prop_map(|t| t.concat())
}

/// Mostly valid UTF-8 with multibyte characters, some invalid bytes.
fn text_input() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        4 => "[a-z \n]{1,5}".prop_map(String::into_bytes),
        4 => prop::sample::select(vec!["é", "ö", "—", "你好", "🎉", "\u{FEFF}", "\r\n"]).prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::sample::select(vec![
            &b"\xFF"[..],
            &b"\xC3"[..],
            &b"\xE2\x82"[..],
            &b"\xF0\x9F\x98"[..],
            &b"\x80"[..],
            &b"\xE0\x80"[..],
            &b"\xED\xA0\x80"[..],
        ])
        .prop_map(<[u8]>::to_vec),
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

/// An input and some cut points inside it.
fn with_cuts(input: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    input.prop_flat_map(|i| {
        let len = i.len();
        (Just(i), prop::collection::vec(0..=len, 0..12))
    })
}

// ---------------------------------------------------------------------------
// Reference models, written from the contract's words
// ---------------------------------------------------------------------------

/// Splits on CR, LF and CRLF; the last element is an unterminated line
/// (possibly empty).
fn split_lines(input: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\n' => {
                lines.push(&input[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                lines.push(&input[start..i]);
                i += if input.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                start = i;
            }
            _ => i += 1,
        }
    }
    (lines, &input[start..])
}

/// The WHATWG event-stream interpretation: BOM skipped once, comments, `id`
/// and `retry` dropped, `data` joined with LF, an empty line dispatches, an
/// unfinished event at the end is discarded.
fn sse_reference(input: &[u8]) -> Vec<Event> {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let (lines, _unterminated) = split_lines(input);
    let mut out = Vec::new();
    let mut name: Option<Vec<u8>> = None;
    let mut data: Option<Vec<u8>> = None;
    for line in lines {
        if line.is_empty() {
            if let Some(d) = data.take() {
                out.push(Event { name: name.take().map(Bytes::from), data: Bytes::from(d) });
            }
            name = None;
            continue;
        }
        if line[0] == b':' {
            continue;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => (&line[..i], line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..])),
            None => (line, &b""[..]),
        };
        match field {
            b"data" => match &mut data {
                None => data = Some(value.to_vec()),
                Some(d) => {
                    d.push(b'\n');
                    d.extend_from_slice(value);
                }
            },
            b"event" => name = (!value.is_empty()).then(|| value.to_vec()),
            _ => {}
        }
    }
    out
}

/// NDJSON: lines end in LF (a CR before it belongs to the ending); each
/// non-empty line is one event, a last line without LF too.
fn ndjson_reference(input: &[u8]) -> Vec<Event> {
    input
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .map(|l| Event { name: None, data: Bytes::copy_from_slice(l) })
        .collect()
}

fn concat_data(events: &[Event]) -> Vec<u8> {
    events.iter().flat_map(|e| e.data.iter().copied()).collect()
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn sse_any_split_gives_the_whole_input_events((input, cuts) in with_cuts(sse_input())) {
        let whole = run(Wire::Sse, BIG, &input, &[]);
        prop_assert_eq!(&whole.1, &None);
        prop_assert_eq!(&run(Wire::Sse, BIG, &input, &cuts), &whole, "cuts {:?}", cuts);
        prop_assert_eq!(&run(Wire::Sse, BIG, &input, &every_byte(&input)), &whole, "byte at a time");
    }

    #[test]
    fn sse_events_follow_the_whatwg_rules(input in sse_input()) {
        prop_assert_eq!(run(Wire::Sse, BIG, &input, &[]).0, sse_reference(&input));
    }

    #[test]
    fn ndjson_any_split_gives_the_whole_input_events((input, cuts) in with_cuts(ndjson_input())) {
        let whole = run(Wire::Ndjson, BIG, &input, &[]);
        prop_assert_eq!(&whole.1, &None);
        prop_assert_eq!(&run(Wire::Ndjson, BIG, &input, &cuts), &whole, "cuts {:?}", cuts);
        prop_assert_eq!(&run(Wire::Ndjson, BIG, &input, &every_byte(&input)), &whole, "byte at a time");
    }

    #[test]
    fn ndjson_events_are_the_non_empty_lines_untouched(input in ndjson_input()) {
        prop_assert_eq!(run(Wire::Ndjson, BIG, &input, &[]).0, ndjson_reference(&input));
    }

    /// With a small bound, where the error comes can depend on nothing but
    /// the input: the same events, then the same verdict, however it is cut.
    #[test]
    fn ndjson_bound_does_not_depend_on_the_split(
        (input, cuts) in with_cuts(ndjson_input()),
        max in 4usize..40,
    ) {
        let whole = run(Wire::Ndjson, max, &input, &[]);
        prop_assert_eq!(&run(Wire::Ndjson, max, &input, &cuts), &whole, "cuts {:?}", cuts);
        prop_assert_eq!(&run(Wire::Ndjson, max, &input, &every_byte(&input)), &whole, "byte at a time");
    }

    /// Same for SSE: with a small bound, every line and event over it is an
    /// error whichever way the bytes were cut.
    #[test]
    fn sse_bound_does_not_depend_on_the_split(
        (input, cuts) in with_cuts(sse_input()),
        max in 8usize..48,
    ) {
        let whole = run(Wire::Sse, max, &input, &[]);
        prop_assert_eq!(&run(Wire::Sse, max, &input, &cuts), &whole, "cuts {:?}", cuts);
        prop_assert_eq!(&run(Wire::Sse, max, &input, &every_byte(&input)), &whole, "byte at a time");
    }

    #[test]
    fn text_any_split_is_byte_identical_valid_utf8((input, cuts) in with_cuts(text_input())) {
        let (whole, err) = run(Wire::Text, BIG, &input, &[]);
        prop_assert_eq!(err, None);
        let expected = String::from_utf8_lossy(&input).into_owned().into_bytes();
        prop_assert_eq!(&concat_data(&whole), &expected);
        for cuts in [cuts.clone(), every_byte(&input)] {
            let (events, err) = run(Wire::Text, BIG, &input, &cuts);
            prop_assert_eq!(err, None);
            for e in &events {
                prop_assert!(std::str::from_utf8(&e.data).is_ok(), "event not UTF-8: {:?}", e.data);
                prop_assert!(!e.data.is_empty(), "empty text event");
            }
            prop_assert_eq!(&concat_data(&events), &expected, "cuts {:?}", cuts);
        }
    }

    /// Text is never held back waiting for more: after each chunk, at most
    /// the start of one unfinished UTF-8 sequence (< 4 bytes) is left, and
    /// a chunk gives at most one event.
    #[test]
    fn text_each_chunk_is_one_event_at_once((input, cuts) in with_cuts(text_input())) {
        let mut d = Decoder::new(Wire::Text, BIG);
        let mut buf = BytesMut::new();
        for chunk in pieces(&input, &cuts) {
            buf.extend_from_slice(chunk);
            let mut events = Vec::new();
            prop_assert!(drain(&mut d, &mut buf, false, &mut events).is_ok());
            prop_assert!(events.len() <= 1, "one chunk gave {} events", events.len());
            prop_assert!(buf.len() < 4, "{} bytes held back", buf.len());
            if !buf.is_empty() {
                prop_assert!(std::str::from_utf8(&buf).is_err(), "a whole character held back: {:?}", &buf[..]);
            }
        }
    }

    /// The `Reframer` (decoder + encoder) writes byte-identical output
    /// however its input is cut.
    #[test]
    fn reframer_output_is_byte_identical_for_any_split(
        (input, cuts) in with_cuts(sse_input()),
        wire in prop::sample::select(vec![Wire::Sse, Wire::Ndjson]),
    ) {
        let whole = reframe(wire, &input, &[]);
        prop_assert_eq!(&reframe(wire, &input, &cuts), &whole);
        prop_assert_eq!(&reframe(wire, &input, &every_byte(&input)), &whole);
    }

    /// The reframer writes exactly the events the decoder reads, encoded,
    /// and stops on the same bound error: its fast path for one-line SSE
    /// events changes nothing a client sees, however the input is cut.
    #[test]
    fn reframer_writes_the_decoded_events(
        (input, cuts) in with_cuts(prop_oneof![sse_events_input(), sse_input()]),
        max in 1usize..40,
    ) {
        for max in [max, BIG] {
            let (events, err) = run(Wire::Sse, max, &input, &cuts);
            let mut enc = SseEncoder::new();
            let mut expected = BytesMut::new();
            for e in &events {
                enc.encode(&mut expected, e.name.as_deref(), &e.data);
            }
            for reframed in [reframe_bounded, reframe_drained] {
                let (out, rerr, last) = reframed(Wire::Sse, max, &input, &cuts);
                prop_assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&expected), "max {}", max);
                prop_assert_eq!(rerr, err);
                prop_assert_eq!(last, events.len() as u64);
            }
        }
    }

    /// Encoder → SSE decoder is the identity on names and on data, once CRLF
    /// and CR in the data are read as the LF the decoder joins lines with.
    #[test]
    fn encoder_round_trips_through_the_sse_decoder(
        events in prop::collection::vec((enc_name(), enc_data()), 0..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut enc = SseEncoder::new();
        let mut wire = BytesMut::new();
        for (i, (name, data)) in events.iter().enumerate() {
            let id = enc.encode(&mut wire, name.as_deref().map(str::as_bytes), data.as_bytes());
            prop_assert_eq!(id, i as u64 + 1);
        }
        prop_assert_eq!(enc.last_id(), events.len() as u64);
        let text = std::str::from_utf8(&wire).expect("encoder output is UTF-8 for UTF-8 input");
        let ids: Vec<String> = text.lines().filter_map(|l| l.strip_prefix("id: ")).map(String::from).collect();
        let expected_ids: Vec<String> = (1..=events.len()).map(|i| i.to_string()).collect();
        prop_assert_eq!(ids, expected_ids, "ids 1..N, one per event, in:\n{}", text);

        let cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        let (decoded, err) = run(Wire::Sse, BIG, &wire, &cuts);
        prop_assert_eq!(err, None);
        let expected: Vec<Event> = events
            .iter()
            .map(|(name, data)| Event {
                name: name.as_ref().filter(|n| !n.is_empty()).map(|n| Bytes::copy_from_slice(n.as_bytes())),
                data: Bytes::from(data.replace("\r\n", "\n").replace('\r', "\n")),
            })
            .collect();
        prop_assert_eq!(decoded, expected, "encoded as:\n{:?}", text);
    }
}

/// An event name as an upstream would send it: one line.
fn enc_name() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        Just("message_start".to_string()),
        Just("error".to_string()),
        "[a-z_.:]{0,12}",
        "[ a-zé🎉]{1,6}",
    ])
}

/// Event data with every kind of line ending, colons and field look-alikes.
fn enc_data() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("\r".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("\n\n".to_string()),
        Just("data: x".to_string()),
        Just("event: y".to_string()),
        Just("id: 9".to_string()),
        Just(": c".to_string()),
        Just(" ".to_string()),
        Just("{\"a\":\"é🎉\"}".to_string()),
        "[a-z ]{0,8}",
    ];
    prop::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

/// Runs a `Reframer` over `input` cut at `cuts`; returns everything written.
fn reframe(wire: Wire, input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<TooLarge>, u64) {
    reframe_bounded(wire, BIG, input, cuts)
}

/// `reframe` with `limits.max_event_bytes` = `max`.
fn reframe_bounded(wire: Wire, max: usize, input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<TooLarge>, u64) {
    let mut r = Reframer::new(wire, max);
    let mut out = BytesMut::new();
    for chunk in pieces(input, cuts) {
        r.feed(Bytes::copy_from_slice(chunk));
        loop {
            match r.next_event(&mut out) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return (out.to_vec(), Some(e), r.last_id()),
            }
        }
    }
    r.feed_eof();
    loop {
        match r.next_event(&mut out) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return (out.to_vec(), Some(e), r.last_id()),
        }
    }
    (out.to_vec(), None, r.last_id())
}

/// `reframe_bounded` with `Reframer::drain` (what a direct stream uses);
/// also checks that its event count matches the ids given.
fn reframe_drained(wire: Wire, max: usize, input: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<TooLarge>, u64) {
    let mut r = Reframer::new(wire, max);
    let mut out = BytesMut::new();
    let mut events = 0;
    for chunk in pieces(input, cuts) {
        r.feed(Bytes::copy_from_slice(chunk));
        if let Err(e) = r.drain(&mut out, &mut events) {
            assert_eq!(events, r.last_id());
            return (out.to_vec(), Some(e), r.last_id());
        }
    }
    r.feed_eof();
    let err = r.drain(&mut out, &mut events).err();
    assert_eq!(events, r.last_id());
    (out.to_vec(), err, r.last_id())
}

// ---------------------------------------------------------------------------
// Fixed cases around the bound, each tried at every cut
// ---------------------------------------------------------------------------

/// Every single cut, and byte at a time, give what the whole gives.
fn assert_split_invariant(wire: Wire, max: usize, input: &[u8]) -> Outcome {
    let whole = run(wire, max, input, &[]);
    for cut in 1..input.len() {
        assert_eq!(
            run(wire, max, input, &[cut]),
            whole,
            "{wire:?} max {max}, cut at {cut} of {:?}",
            String::from_utf8_lossy(input)
        );
    }
    assert_eq!(run(wire, max, input, &every_byte(input)), whole, "{wire:?} max {max}, byte at a time");
    whole
}

#[test]
fn sse_data_line_over_the_bound_is_an_error_at_every_cut() {
    let mut input = b"data: ok\n\n".to_vec();
    input.extend_from_slice(b"data: ");
    input.extend(std::iter::repeat_n(b'x', 40));
    input.extend_from_slice(b"\n\ndata: after\n\n");
    let (events, err) = assert_split_invariant(Wire::Sse, 16, &input);
    assert_eq!(events, vec![Event { name: None, data: Bytes::from_static(b"ok") }]);
    assert!(err.is_some());
}

#[test]
fn sse_event_over_the_bound_is_an_error_at_every_cut() {
    let (events, err) = assert_split_invariant(Wire::Sse, 16, b"data: 0123456\ndata: 0123456\ndata: 0123456\n\n");
    assert_eq!((events.len(), err.is_some()), (0, true));
}

/// "One upstream line … larger than this ends the stream with an error":
/// a comment or `event:` line counts as much as a `data:` line, and whether
/// it fails must not depend on how the network cut it.
#[test]
fn sse_any_line_over_the_bound_is_an_error_however_it_is_cut() {
    for long_line in [
        format!(": {}\n", "c".repeat(64)),
        format!("event: {}\n", "n".repeat(64)),
        format!("id: {}\n", "7".repeat(64)),
        // A data line whose value fits the bound but whose line does not.
        format!("data: {}\n", "d".repeat(14)),
    ] {
        let input = format!("data: ok\n\n{long_line}data: after\n\n");
        let (events, err) = assert_split_invariant(Wire::Sse, 16, input.as_bytes());
        assert_eq!(events.len(), 1, "{long_line:?}");
        assert!(err.is_some(), "a {}-byte line passed a 16-byte bound: {long_line:?}", long_line.len() - 1);
    }
}

#[test]
fn ndjson_line_over_the_bound_is_an_error_at_every_cut() {
    let (events, err) = assert_split_invariant(Wire::Ndjson, 8, b"{\"a\":1}\r\n{\"bb\":22222}\n{}\n");
    assert_eq!(events, vec![Event { name: None, data: Bytes::from_static(b"{\"a\":1}") }]);
    assert!(err.is_some());
    // Exactly at the bound, with and without CR: fine.
    let (events, err) = assert_split_invariant(Wire::Ndjson, 8, b"12345678\r\n12345678\n12345678");
    assert_eq!((events.len(), err), (3, None));
}

#[test]
fn text_chunk_over_the_bound_is_an_error() {
    let (_, err) = run(Wire::Text, 8, b"0123456789", &[]);
    assert!(err.is_some());
    let (events, err) = run(Wire::Text, 8, b"0123456789", &[5]);
    assert_eq!((events.len(), err), (2, None));
}

#[test]
fn sse_bom_split_across_chunks_is_skipped() {
    let input = "\u{FEFF}data: a\n\n".as_bytes();
    let (events, err) = assert_split_invariant(Wire::Sse, BIG, input);
    assert_eq!(err, None);
    assert_eq!(events, vec![Event { name: None, data: Bytes::from_static(b"a") }]);
}
