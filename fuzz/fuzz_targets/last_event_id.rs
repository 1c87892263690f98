//! `Last-Event-ID` handling, from the request to the replay store:
//! - an accepted id is never empty and has no CR, LF or NUL (it could not have come
//!   from an event stream, and it must not break one when echoed);
//! - an upstream event carrying that id parses back to the very same id, and the store
//!   resumes right after it;
//! - the id query parameter never changes the stream key.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ssegate::replay::{
    resume_request, Budget, Lookup, MemoryRing, ReplayStore, RingBounds, StoredEvent,
};
use ssegate::sse::Parser;

fuzz_target!(|input: &[u8]| {
    // Input: header bytes, NUL, query string.
    let mut parts = input.splitn(2, |&b| b == 0);
    let header = parts.next().unwrap_or_default();
    let Ok(query) = std::str::from_utf8(parts.next().unwrap_or_default()) else {
        return;
    };
    let header = (!header.is_empty()).then_some(header);
    let r = resume_request(header, query, Some("lastEventId"));

    // The id parameter, whatever its value, is not part of the key.
    let with_param = format!("{query}&lastEventId=x%0Ay");
    assert_eq!(
        resume_request(None, &with_param, Some("lastEventId")).query_key,
        r.query_key
    );

    let Some(id) = r.last_event_id else {
        return;
    };
    assert!(!id.is_empty() && !id.contains(['\r', '\n', '\0']));

    let mut parser = Parser::new(1 << 20);
    parser.push(
        format!("id: other\ndata: a\n\nid: {id}\ndata: b\n\ndata: c\n\nid: z\ndata: d\n\n")
            .as_bytes(),
    );
    let mut store = MemoryRing::new(
        RingBounds {
            max_events: 16,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        },
        Budget::new(1 << 20),
    );
    let mut ids = vec![];
    while let Some(ev) = parser.next_block().expect("within the cap") {
        ids.push(ev.id.clone());
        store.push(StoredEvent {
            id: ev.id.as_str().into(),
            has_id_field: ev.has_id_field,
            sets_retry: ev.retry.is_some(),
            raw: ev.raw,
            at: Instant::now(),
        });
    }
    assert_eq!(ids[1], id, "the id did not survive an event stream");
    match store.after(&id) {
        Lookup::After(rest) => {
            let expect = if id == "z" { 0 } else { 2 };
            assert_eq!(rest.len(), expect, "resumed at the wrong place for {id:?}");
        }
        Lookup::Unknown => panic!("stored id {id:?} not found"),
    }
});
