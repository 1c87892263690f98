//! The `text/event-stream` format: an incremental parser and the few bytes the gateway
//! writes itself (heartbeats, the shutdown `retry:` hint).
//!
//! The parser follows the WHATWG HTML standard, section 9.2.6 "Interpreting an event
//! stream". It has no I/O and knows nothing of HTTP: push bytes in as they arrive, in any
//! chunking, and pull dispatched events out. Each event keeps the raw bytes of its block
//! so the gateway can forward and replay the upstream's bytes verbatim.
//!
//! It also answers the one question the relay asks before writing a heartbeat: "is the
//! stream at an event boundary?", that is, would a comment plus a blank line written now
//! leave every conforming client's view of the stream unchanged.

use bytes::{Bytes, BytesMut};

/// UTF-8 byte order mark. "One leading U+FEFF BYTE ORDER MARK character must be ignored
/// if any are present."
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Default cap on one event block (all its lines), in bytes.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Why the parser gave up on a stream.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// A block (or a single line) grew past the configured cap without ending.
    #[error("event larger than {limit} bytes")]
    EventTooLarge {
        /// The cap in force.
        limit: usize,
    },
}

/// One dispatched event, as a conforming client would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The last event ID string at dispatch ("" when none or reset). It persists across
    /// events that carry no `id` field.
    pub id: String,
    /// Whether this event's own block carried a valid `id` field (else the id was
    /// inherited from an earlier block).
    pub has_id_field: bool,
    /// The event type; `message` when the block had no `event` field.
    pub event_type: String,
    /// The data buffer with its one trailing LF removed.
    pub data: String,
    /// The reconnection time set by a `retry` field in this block, in milliseconds.
    pub retry: Option<u64>,
    /// The block's bytes, from its first field line to its terminating blank line
    /// inclusive. Comment lines before the first field are not part of any block.
    pub raw: Bytes,
    /// False for a block that dispatched nothing (no data) but set `id` or `retry`.
    pub dispatched: bool,
}

/// Blocks larger than this are not left sharing the parser's buffer (see
/// `Parser::take_front`).
const RELEASE_AFTER: usize = 64 * 1024;

/// Incremental event-stream parser: `push` bytes, then call `next_event` until `None`.
#[derive(Debug)]
pub struct Parser {
    /// Bytes not yet consumed as a finished block: the current block's lines, then the
    /// unscanned tail. Kept so each event can carry its raw bytes without a copy per line.
    buf: BytesMut,
    /// Offset in `buf` where line scanning resumes.
    scan: usize,
    /// Start of the current (possibly partial) line in `buf`.
    line_start: usize,
    /// The previous line ended with CR: a LF at the start of the next bytes belongs to it.
    after_cr: bool,
    /// Still deciding whether the stream opens with a BOM (it may arrive split).
    bom_pending: bool,
    /// The current block has had a field line (not only comments), so a blank line
    /// written now would be the upstream's business, not ours.
    in_block: bool,
    /// Data buffer of the pending event.
    data: String,
    /// Event type buffer of the pending event.
    event_type: String,
    /// Last event ID buffer; never reset by dispatch.
    last_event_id: String,
    /// The current block set the id.
    block_has_id: bool,
    /// `retry` value seen in the current block.
    block_retry: Option<u64>,
    /// Cap on a block's size.
    max_event_bytes: usize,
    /// Build `data` and `event_type` strings. The gateway itself forwards raw blocks
    /// and never looks at them, so its parsers skip that work per event.
    keep_payload: bool,
    /// The current block has a `data` field (tracked instead of `data` when
    /// `keep_payload` is off).
    has_data: bool,
}

impl Default for Parser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl Parser {
    /// A parser that refuses blocks (and lines) longer than `max_event_bytes`.
    pub fn new(max_event_bytes: usize) -> Self {
        Parser {
            buf: BytesMut::new(),
            scan: 0,
            line_start: 0,
            after_cr: false,
            bom_pending: true,
            in_block: false,
            data: String::new(),
            event_type: String::new(),
            last_event_id: String::new(),
            block_has_id: false,
            block_retry: None,
            max_event_bytes,
            keep_payload: true,
            has_data: false,
        }
    }

    /// A parser for forwarding: it finds blocks, ids and `retry`, but leaves `data`
    /// empty and `event_type` as `message` in what it returns (the raw bytes carry them).
    pub fn boundaries_only(max_event_bytes: usize) -> Self {
        Parser {
            keep_payload: false,
            ..Self::new(max_event_bytes)
        }
    }

    /// For bytes from the middle of a stream (blocks handed over or replayed): a leading
    /// BOM is then part of the first line, not a stream's BOM.
    pub fn mid_stream(mut self) -> Self {
        self.bom_pending = false;
        self
    }

    /// Append bytes from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The last event ID string a client would hold now.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// True when a comment line followed by a blank line, written now, changes nothing a
    /// conforming client observes: no partial line and no field line since the last
    /// blank line. A lone CR at the very end counts as a line end; if its LF follows
    /// later, the client sees one more blank line, which dispatches nothing.
    pub fn at_boundary(&self) -> bool {
        !self.in_block && self.line_start == self.buf.len() && !self.bom_pending_with_bytes()
    }

    /// Bytes buffered for the current block (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn bom_pending_with_bytes(&self) -> bool {
        self.bom_pending && !self.buf.is_empty()
    }

    /// Process buffered lines until one event is dispatched or the bytes run out.
    pub fn next_event(&mut self) -> Result<Option<Event>, ParseError> {
        loop {
            match self.next_block()? {
                Some(ev) if !ev.dispatched => continue,
                other => return Ok(other),
            }
        }
    }

    /// Like [`Parser::next_event`], but also returns blocks that had fields yet
    /// dispatched nothing (an `id` or `retry` alone): what a replay must keep.
    pub fn next_block(&mut self) -> Result<Option<Event>, ParseError> {
        if self.bom_pending {
            let n = self.buf.len().min(BOM.len());
            if self.buf[..n] != BOM[..n] {
                self.bom_pending = false;
            } else if n == BOM.len() {
                let _ = self.buf.split_to(BOM.len());
                self.bom_pending = false;
            } else {
                return Ok(None); // a prefix of the BOM: wait for more bytes
            }
        }
        loop {
            if self.after_cr && self.scan < self.buf.len() {
                self.after_cr = false;
                if self.buf[self.scan] == b'\n' {
                    // Second half of a CRLF split across pushes: not a new line. Inside a
                    // block it stays in the raw bytes; after a dispatch it is dropped so
                    // that no block starts with a line ending.
                    if self.scan == 0 {
                        let _ = self.buf.split_to(1);
                    } else {
                        self.scan += 1;
                        self.line_start = self.scan;
                    }
                }
            }
            let tail = &self.buf[self.scan..];
            let Some(pos) = memchr::memchr2(b'\r', b'\n', tail) else {
                self.scan = self.buf.len();
                return self.check_size().map(|()| None);
            };
            let eol = self.scan + pos;
            let next = eol + 1;
            // Checked on every line and block, not only on a partial line: whether the
            // cap is hit must not depend on how the bytes were chunked.
            let blank = eol == self.line_start; // ends the block `buf[..next]`
            if next - self.line_start > self.max_event_bytes
                || (blank && next > self.max_event_bytes)
            {
                return Err(self.too_large());
            }
            // A CR ends the line by itself; an LF right after it (now or in a later push)
            // is handled at the top of the loop, so the result never depends on chunking.
            self.after_cr = self.buf[eol] == b'\r';
            let line_start = self.line_start;
            self.scan = next;
            self.line_start = next;
            if let Some(ev) = self.process_line(line_start, eol, next) {
                return Ok(Some(ev));
            }
        }
    }

    fn check_size(&self) -> Result<(), ParseError> {
        if self.buf.len() > self.max_event_bytes {
            return Err(self.too_large());
        }
        Ok(())
    }

    fn too_large(&self) -> ParseError {
        ParseError::EventTooLarge {
            limit: self.max_event_bytes,
        }
    }

    /// Handles the line `buf[start..eol]`, whose line ending runs to `next`.
    fn process_line(&mut self, start: usize, eol: usize, next: usize) -> Option<Event> {
        let line = &self.buf[start..eol];
        if line.is_empty() {
            return self.dispatch(next);
        }
        if line[0] == b':' {
            if !self.in_block {
                // A comment between blocks belongs to no event: forget its bytes so a
                // stream of comments alone cannot grow the buffer.
                let _ = self.take_front(next);
                self.scan -= next;
                self.line_start -= next;
            }
            return None;
        }
        self.in_block = true;
        let (name, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match name {
            b"data" if !self.keep_payload => self.has_data = true,
            b"data" => {
                self.data.push_str(&String::from_utf8_lossy(value));
                self.data.push('\n');
            }
            b"event" if self.keep_payload => {
                self.event_type = String::from_utf8_lossy(value).into_owned()
            }
            b"id" if !value.contains(&0) => {
                self.last_event_id = String::from_utf8_lossy(value).into_owned();
                self.block_has_id = true;
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                // Digits only, so parsing fails only on overflow: ignore it then.
                if let Ok(ms) = std::str::from_utf8(value).unwrap_or("x").parse() {
                    self.block_retry = Some(ms);
                }
            }
            _ => {} // unknown field: ignored
        }
        None
    }

    /// Takes the first `n` bytes of the buffer. After a large block the rest moves to an
    /// allocation of its own: split-off bytes share the buffer's, so otherwise one
    /// big event would pin its memory for the parser's whole life.
    fn take_front(&mut self, n: usize) -> BytesMut {
        let front = self.buf.split_to(n);
        if n > RELEASE_AFTER {
            self.buf = BytesMut::from(&self.buf[..]);
        }
        front
    }

    /// A blank line ended at `next`: dispatch the pending event, if it has data.
    fn dispatch(&mut self, next: usize) -> Option<Event> {
        let raw = self.take_front(next).freeze();
        self.scan -= next;
        self.line_start -= next;
        let had_fields = std::mem::take(&mut self.in_block);
        let has_id_field = std::mem::take(&mut self.block_has_id);
        let retry = self.block_retry.take();
        let event_type = std::mem::take(&mut self.event_type);
        let has_data = std::mem::take(&mut self.has_data) || !self.data.is_empty();
        if !has_data {
            // No dispatch, but a block that moved the id or set `retry` still matters
            // to a replay: hand it out as a non-dispatched block.
            return had_fields.then(|| Event {
                id: self.last_event_id.clone(),
                has_id_field,
                event_type: String::new(),
                data: String::new(),
                retry,
                raw,
                dispatched: false,
            });
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the trailing LF
        Some(Event {
            dispatched: true,
            id: self.last_event_id.clone(),
            has_id_field,
            event_type: if event_type.is_empty() {
                "message".to_owned()
            } else {
                event_type
            },
            data,
            retry,
            raw,
        })
    }
}

/// The bytes of a heartbeat: a comment line and a blank line. The blank line makes
/// line-buffering intermediaries pass it on; at a boundary it dispatches nothing.
pub fn heartbeat(comment: &str) -> Bytes {
    Bytes::from(format!(":{comment}\n\n"))
}

/// The block written when the gateway ends a stream on shutdown: a reconnection delay
/// and a comment that says why.
pub fn shutdown_hint(retry_ms: u64) -> Bytes {
    Bytes::from(format!(": ssegate shutting down\nretry: {retry_ms}\n\n"))
}

/// Strips the leading BOM of a stream whose first bytes are no longer the first bytes
/// the client sees (because the gateway wrote a heartbeat before the upstream spoke);
/// a BOM there would otherwise become part of the first field name.
#[derive(Debug, Default)]
pub struct BomStripper {
    /// Bytes that may still turn out to be a BOM.
    held: Vec<u8>,
    /// Decided: pass everything through from now on.
    done: bool,
}

impl BomStripper {
    /// Feeds upstream bytes; returns what to forward now.
    pub fn feed(&mut self, bytes: Bytes) -> Bytes {
        if self.done {
            return bytes;
        }
        self.held.extend_from_slice(&bytes);
        let n = self.held.len().min(BOM.len());
        if self.held[..n] != BOM[..n] {
            self.done = true;
            return Bytes::from(std::mem::take(&mut self.held));
        }
        if n < BOM.len() {
            return Bytes::new();
        }
        self.done = true;
        let mut rest = std::mem::take(&mut self.held);
        rest.drain(..BOM.len());
        Bytes::from(rest)
    }

    /// Bytes still held when the stream ends (a BOM prefix that never completed).
    pub fn finish(&mut self) -> Bytes {
        self.done = true;
        Bytes::from(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = Parser::default();
        let mut out = vec![];
        for c in chunks {
            p.push(c);
            while let Some(e) = p.next_event().unwrap() {
                out.push(e);
            }
        }
        out
    }

    fn summary(evs: &[Event]) -> Vec<(String, String, String)> {
        evs.iter()
            .map(|e| (e.id.clone(), e.event_type.clone(), e.data.clone()))
            .collect()
    }

    #[test]
    fn basic_event_and_type() {
        let e = parse_all(&[b"event: ping\ndata: hello\n\n"]);
        assert_eq!(summary(&e), [("".into(), "ping".into(), "hello".into())]);
        assert_eq!(&e[0].raw[..], b"event: ping\ndata: hello\n\n");
    }

    #[test]
    fn type_defaults_to_message_and_resets_after_dispatch() {
        let e = parse_all(&[b"event: a\ndata: 1\n\ndata: 2\n\n"]);
        assert_eq!(e[0].event_type, "a");
        assert_eq!(e[1].event_type, "message");
    }

    #[test]
    fn multiline_data_joined_with_lf_and_one_trailing_lf_removed() {
        let e = parse_all(&[b"data: a\ndata:b\ndata\ndata:  c\n\n"]);
        assert_eq!(e[0].data, "a\nb\n\n c");
    }

    #[test]
    fn only_one_leading_space_removed() {
        let e = parse_all(&[b"data:  two\n\n"]);
        assert_eq!(e[0].data, " two");
    }

    #[test]
    fn line_endings_cr_lf_crlf() {
        let e = parse_all(&[b"data: a\r\rdata: b\n\ndata: c\r\n\r\n"]);
        assert_eq!(summary(&e).len(), 3);
        assert_eq!(e[0].data, "a");
        assert_eq!(e[1].data, "b");
        assert_eq!(e[2].data, "c");
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_ending() {
        let e = parse_all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].data, "a\nb");
        assert_eq!(&e[0].raw[..], b"data: a\r\ndata: b\r\n\r");
    }

    #[test]
    fn bom_stripped_once_even_when_split() {
        let e = parse_all(&[b"\xEF", b"\xBB", b"\xBFdata: x\n\n"]);
        assert_eq!(e[0].data, "x");
        // A second BOM is part of the field name, so the line is an unknown field.
        let e = parse_all(&[b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\ndata: y\n\n"]);
        assert_eq!(summary(&e), [("".into(), "message".into(), "y".into())]);
    }

    #[test]
    fn comments_ignored_and_not_part_of_raw_between_blocks() {
        let e = parse_all(&[b": hi\n:\ndata: x\n: inside\n\n"]);
        assert_eq!(e[0].data, "x");
        assert_eq!(&e[0].raw[..], b"data: x\n: inside\n\n");
    }

    #[test]
    fn field_without_colon_has_empty_value() {
        let e = parse_all(&[b"data\n\n"]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].data, "");
    }

    #[test]
    fn names_are_case_sensitive_and_unknown_ignored() {
        let e = parse_all(&[b"Data: no\nfoo: bar\ndata: yes\n\n"]);
        assert_eq!(e[0].data, "yes");
    }

    #[test]
    fn id_persists_resets_and_ignores_nul() {
        let e =
            parse_all(&[b"id: 1\ndata: a\n\ndata: b\n\nid: 2\x00x\ndata: c\n\nid\ndata: d\n\n"]);
        let ids: Vec<_> = e.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1", "1", "1", ""]);
        assert!(e[0].has_id_field && !e[1].has_id_field && !e[2].has_id_field);
    }

    #[test]
    fn id_only_block_moves_last_id_without_dispatch() {
        let e = parse_all(&[b"id: 7\n\ndata: x\n\n"]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].id, "7");
    }

    #[test]
    fn blocks_without_data_come_out_of_next_block_only() {
        let mut p = Parser::default();
        p.push(b"id: 7\n\nretry: 10\n\n: c\n\ndata: x\n\n");
        let b1 = p.next_block().unwrap().unwrap();
        assert!(!b1.dispatched && b1.has_id_field && b1.id == "7");
        let b2 = p.next_block().unwrap().unwrap();
        assert!(!b2.dispatched && b2.retry == Some(10));
        let b3 = p.next_block().unwrap().unwrap();
        assert!(b3.dispatched && b3.data == "x" && &b3.raw[..] == b"data: x\n\n");
        assert!(p.next_block().unwrap().is_none());
    }

    #[test]
    fn boundaries_only_finds_the_same_blocks() {
        let input = b"id: 1\nevent: x\ndata: a\n\nid: 2\n\ndata\n\nevent: y\n\n";
        let mut full = Parser::default();
        let mut lean = Parser::boundaries_only(DEFAULT_MAX_EVENT_BYTES);
        full.push(input);
        lean.push(input);
        loop {
            let (a, b) = (full.next_block().unwrap(), lean.next_block().unwrap());
            match (a, b) {
                (Some(a), Some(b)) => {
                    assert_eq!(
                        (a.id, a.has_id_field, a.raw, a.dispatched),
                        (b.id, b.has_id_field, b.raw, b.dispatched)
                    );
                    assert!(b.data.is_empty());
                }
                (None, None) => break,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn empty_data_buffer_dispatches_nothing() {
        let e = parse_all(&[b"event: x\n\n\n\n"]);
        assert!(e.is_empty());
    }

    #[test]
    fn retry_only_digits() {
        let e =
            parse_all(&[b"retry: 1500\ndata: a\n\nretry: 1.5\ndata: b\n\nretry: x\ndata: c\n\n"]);
        assert_eq!(e[0].retry, Some(1500));
        assert_eq!(e[1].retry, None);
        assert_eq!(e[2].retry, None);
    }

    #[test]
    fn unterminated_event_at_end_is_not_dispatched() {
        let e = parse_all(&[b"data: a\n\ndata: b\n"]);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let e = parse_all(&[b"data: \xFF\n\n"]);
        assert_eq!(e[0].data, "\u{FFFD}");
        assert_eq!(&e[0].raw[..], b"data: \xFF\n\n");
    }

    #[test]
    fn boundary_tracking() {
        let mut p = Parser::default();
        assert!(p.at_boundary());
        p.push(b"data: a");
        let _ = p.next_event().unwrap();
        assert!(!p.at_boundary(), "partial line");
        p.push(b"\n");
        let _ = p.next_event().unwrap();
        assert!(!p.at_boundary(), "field pending");
        p.push(b"\n: comment\n");
        assert!(p.next_event().unwrap().is_some());
        let _ = p.next_event().unwrap();
        assert!(p.at_boundary(), "after dispatch and a comment");
        p.push(b"\r");
        let _ = p.next_event().unwrap();
        assert!(p.at_boundary(), "a lone CR is a line end");
        p.push(b"\xEF");
        let mut fresh = Parser::default();
        fresh.push(b"\xEF\xBB");
        let _ = fresh.next_event().unwrap();
        assert!(!fresh.at_boundary(), "undecided BOM");
    }

    #[test]
    fn a_large_block_does_not_pin_the_parsers_buffer() {
        let mut p = Parser::boundaries_only(1 << 22);
        p.push(format!("data: {}\n\n", "x".repeat(200_000)).as_bytes());
        p.push(b"data: small");
        let big = p.next_block().unwrap().unwrap();
        // What follows the big block no longer lives in its allocation, so dropping the
        // block (as a hub does once it has copied it) frees it.
        let start = big.raw.as_ptr() as usize;
        let pinned = start..start + big.raw.len() + 64;
        p.push(b"\n\n");
        let small = p.next_block().unwrap().unwrap();
        assert_eq!(&small.raw[..], b"data: small\n\n");
        assert!(!pinned.contains(&(small.raw.as_ptr() as usize)));
    }

    #[test]
    fn oversized_event_is_an_error_and_comments_do_not_accumulate() {
        let mut p = Parser::new(64);
        for _ in 0..100 {
            p.push(b": keepalive\n");
            assert!(p.next_event().unwrap().is_none());
        }
        assert!(p.buffered() < 64);
        p.push(&[b'x'; 100]);
        assert_eq!(p.next_event(), Err(ParseError::EventTooLarge { limit: 64 }));
    }

    #[test]
    fn the_cap_does_not_depend_on_chunking() {
        // A block over the cap that arrives whole, a comment line over it between blocks.
        for input in [
            &b"data: 0123456789\n\n"[..],
            b": 0123456789abcdef\ndata: a\n\n",
        ] {
            let mut whole = Parser::boundaries_only(16);
            whole.push(input);
            let mut bytewise = Parser::boundaries_only(16);
            let mut err = None;
            for b in input {
                bytewise.push(&[*b]);
                if let Err(e) = bytewise.next_block() {
                    err = Some(e);
                    break;
                }
            }
            let too_large = ParseError::EventTooLarge { limit: 16 };
            assert_eq!(whole.next_block(), Err(too_large.clone()));
            assert_eq!(err, Some(too_large));
        }
        let mut p = Parser::boundaries_only(16);
        p.push(b"data: 01234567\n\n"); // 16 bytes: at the cap, not over
        assert!(p.next_block().unwrap().is_some());
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let input: &[u8] = b"\xEF\xBB\xBF: c\r\nid: 1\r\nevent: e\rdata: a\r\ndata: b\n\r\nid\n\ndata: c\r\rretry: 10\ndata: d\n\n";
        let whole = parse_all(&[input]);
        assert_eq!(whole.len(), 3);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let parts = parse_all(&[&input[..i], &input[i..j], &input[j..]]);
                assert_eq!(parts, whole, "split at {i},{j}");
            }
        }
    }

    #[test]
    fn bom_stripper() {
        let mut s = BomStripper::default();
        assert_eq!(&s.feed(Bytes::from_static(b"\xEF\xBB"))[..], b"");
        assert_eq!(&s.feed(Bytes::from_static(b"\xBFdata"))[..], b"data");
        assert_eq!(
            &s.feed(Bytes::from_static(b"\xEF\xBB\xBF"))[..],
            b"\xEF\xBB\xBF"
        );
        let mut s = BomStripper::default();
        assert_eq!(&s.feed(Bytes::from_static(b"\xEFx"))[..], b"\xEFx");
        let mut s = BomStripper::default();
        assert_eq!(&s.feed(Bytes::from_static(b"\xEF"))[..], b"");
        assert_eq!(&s.finish()[..], b"\xEF");
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn chunking_never_changes_events(
                input in proptest::collection::vec(
                    prop_oneof![
                        Just(b"data: x".to_vec()), Just(b"id: 9".to_vec()), Just(vec![b'\r']),
                        Just(vec![b'\n']), Just(b":c".to_vec()), Just(b"event: t".to_vec()),
                        Just(BOM.to_vec()), Just(b"retry: 5".to_vec()), Just(b"id".to_vec()),
                    ], 0..40).prop_map(|v: Vec<Vec<u8>>| v.concat()),
                cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
            ) {
                let whole = parse_all(&[&input]);
                let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
                points.sort();
                let mut chunks: Vec<&[u8]> = vec![];
                let mut last = 0;
                for p in points { chunks.push(&input[last..p]); last = p; }
                chunks.push(&input[last..]);
                prop_assert_eq!(parse_all(&chunks), whole);
            }
        }
    }
}
