//! The SSE parser against itself and against the standard:
//! 1. events from the whole input equal those from the same input cut into chunks
//!    (cut points taken from the input's first bytes);
//! 2. they equal a plain line-by-line reading of WHATWG HTML 9.2.6 (below);
//! 3. the blocks' raw bytes, parsed again, give the same events (replay and upgrade
//!    handover forward those bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssegate::sse::Parser;

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
});
