//! The SSE parser against itself and against the standard:
//! 1. events from the whole input equal those from the same input cut into chunks
//!    (cut points taken from the input's first bytes);
//! 2. they equal a plain line-by-line reading of WHATWG HTML 9.2.6 (below);
//! 3. the blocks' raw bytes, parsed again, give the same events (replay and upgrade
//!    handover forward those bytes);
//! 4. the mode the gateway runs (`boundaries_only`, with a small cap taken from the
//!    input) finds the same blocks as the full parser, whatever the chunking, and stops
//!    with `EventTooLarge` exactly when a block, a line or the unfinished rest is over
//!    the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegate::sse::{Event, ParseError, Parser};

/// What a client observes of one dispatched event.
type Seen = (String, String, String);

fn parse_all(mut p: Parser, chunks: &[&[u8]]) -> (Vec<Seen>, Vec<u8>) {
    let mut seen = vec![];
    let mut raw = vec![];
    for c in chunks {
        p.push(c);
        while let Some(ev) = p.next_block().expect("no size cap") {
            raw.extend_from_slice(&ev.raw);
            if ev.dispatched {
                seen.push((ev.id, ev.event_type, ev.data));
            }
        }
    }
    (seen, raw)
}

/// What a forwarding parser hands on of a block (its data and type stay in `raw`).
type Block = (String, bool, Vec<u8>, bool, Option<u64>);

fn block(ev: Event) -> Block {
    (ev.id, ev.has_id_field, ev.raw.to_vec(), ev.dispatched, ev.retry)
}

/// Blocks until the end or the first error, draining after each push as the gateway does.
fn blocks(mut p: Parser, chunks: &[&[u8]]) -> (Vec<Block>, Option<ParseError>) {
    let mut out = vec![];
    for c in chunks {
        p.push(c);
        loop {
            match p.next_block() {
                Ok(Some(ev)) => out.push(block(ev)),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// Whether any line of `stream` (with its line ending) is longer than `cap`.
fn a_line_over(stream: &[u8], cap: usize) -> bool {
    let mut start = 0;
    let mut i = 0;
    while i < stream.len() {
        if stream[i] == b'\r' || stream[i] == b'\n' {
            let crlf = stream[i] == b'\r' && stream.get(i + 1) == Some(&b'\n');
            // A CR ends the line; the LF after it is not counted in any line.
            if i + 1 - start > cap {
                return true;
            }
            i += 1 + usize::from(crlf);
            start = i;
        } else {
            i += 1;
        }
    }
    false
}

fn check_capped(stream: &[u8], chunks: &[&[u8]], cap: usize) {
    let (all, none) = blocks(Parser::new(usize::MAX), &[stream]);
    assert!(none.is_none());
    let mut rest = Parser::new(usize::MAX);
    rest.push(stream);
    while let Ok(Some(_)) = rest.next_block() {}
    let over = all.iter().any(|b| b.2.len() > cap)
        || a_line_over(stream.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(stream), cap)
        || rest.buffered() > cap;
    let whole = blocks(Parser::boundaries_only(cap), &[stream]);
    let chunked = blocks(Parser::boundaries_only(cap), chunks);
    assert_eq!(whole, chunked, "chunking changed the capped parse");
    assert_eq!(whole.1.is_some(), over, "cap {cap}: the error does not match the sizes");
    if let Some(e) = &whole.1 {
        assert_eq!(e, &ParseError::EventTooLarge { limit: cap });
    }
    assert!(all.starts_with(&whole.0), "capped blocks differ from the full parser's");
    if !over {
        assert_eq!(all, whole.0);
    }
}

/// The standard's algorithm, written as plainly as it reads.
fn reference(input: &[u8]) -> Vec<Seen> {
    let text = String::from_utf8_lossy(input);
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(&text);
    let (mut data, mut event_type, mut last_id) = (String::new(), String::new(), String::new());
    let mut out = vec![];
    let mut rest = text;
    // Only lines with an end of line count: an unfinished last line is discarded at EOF.
    while let Some(pos) = rest.find(['\r', '\n']) {
        let line = &rest[..pos];
        let skip = if rest[pos..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[pos + skip..];
        if line.is_empty() {
            if data.is_empty() {
                event_type.clear();
                continue;
            }
            if data.ends_with('\n') {
                data.pop();
            }
            let t = if event_type.is_empty() {
                "message".to_owned()
            } else {
                event_type.clone()
            };
            out.push((last_id.clone(), t, std::mem::take(&mut data)));
            event_type.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line, ""),
        };
        match field {
            "event" => event_type = value.to_owned(),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => last_id = value.to_owned(),
            _ => {}
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many cut points follow; then the cut points; then the stream.
    let (cuts, stream) = match input.split_first() {
        Some((&n, rest)) if rest.len() >= (n % 8) as usize => rest.split_at((n % 8) as usize),
        _ => (&[][..], input),
    };
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| c as usize * stream.len() / 256)
        .collect();
    points.sort_unstable();
    let mut chunks = vec![];
    let mut at = 0;
    for p in points {
        chunks.push(&stream[at..p]);
        at = p;
    }
    chunks.push(&stream[at..]);

    let (whole, raw) = parse_all(Parser::new(usize::MAX), &[stream]);
    let (chunked, _) = parse_all(Parser::new(usize::MAX), &chunks);
    assert_eq!(whole, chunked, "chunking changed the events");
    assert_eq!(
        whole,
        reference(stream),
        "differs from the standard's reading"
    );
    // As the hub hands them on: bytes from the middle of a stream.
    let (again, _) = parse_all(Parser::new(usize::MAX).mid_stream(), &[&raw]);
    assert_eq!(whole, again, "raw blocks do not reproduce the events");
    // The first byte's other bits pick a small cap, so inputs often go over it.
    let cap = usize::from(input.first().map_or(0, |n| n >> 3)) * 8 + 2;
    check_capped(stream, &chunks, cap);
});
