//! How a stream's parts are written to Redis and read back: the response head, the
//! history entries, and the answer of the `PEEK` script.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redis::Value;

use super::{Entry, Remote};
use crate::replay::StoredEvent;

pub(super) fn flags(b: &StoredEvent) -> u8 {
    u8::from(b.has_id_field) | (u8::from(b.sets_retry) << 1)
}

/// The response head as followers answer it: status, then `name: value` lines.
/// `Set-Cookie` is never stored: it belongs to the request the head answered.
pub fn encode_head(head: &http::response::Parts) -> Vec<u8> {
    let mut out = head.status.as_u16().to_string().into_bytes();
    out.push(b'\n');
    for (name, value) in &head.headers {
        if name == http::header::SET_COOKIE {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

/// Reads back what [`encode_head`] wrote; `None` if it is not that.
pub fn decode_head(bytes: &[u8]) -> Option<http::response::Parts> {
    let mut lines = bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let status = std::str::from_utf8(lines.next()?)
        .ok()?
        .parse::<u16>()
        .ok()?;
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::from_u16(status).ok()?;
    for line in lines {
        let i = line.windows(2).position(|w| w == b": ")?;
        let name = http::HeaderName::from_bytes(&line[..i]).ok()?;
        let value = http::HeaderValue::from_bytes(&line[i + 2..]).ok()?;
        parts.headers.append(name, value);
    }
    Some(parts)
}

pub(super) fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::Nil => Some(b""),
        _ => None,
    }
}

pub(super) fn decode_remote(v: Value) -> Option<Remote> {
    let Value::Array(parts) = v else { return None };
    let [lease, epoch, offset, head, audience, entries, handoff] =
        <[Value; 7]>::try_from(parts).ok()?;
    let text = |v: &Value| bulk(v).map(|b| String::from_utf8_lossy(b).into_owned());
    let reader = text(&lease).filter(|s| !s.is_empty());
    let epoch = text(&epoch).filter(|s| !s.is_empty()).map(Arc::from);
    let offset = text(&offset)?.parse().ok()?;
    let Value::Array(list) = entries else {
        return None;
    };
    // End markers only matter to live followers; a history is its blocks.
    let entries = list
        .iter()
        .map(decode_entry)
        .filter(|e| !e.as_ref().is_some_and(|e| e.end || e.handoff))
        .collect::<Option<Vec<_>>>()?;
    Some(Remote {
        reader,
        epoch,
        offset,
        head: Bytes::copy_from_slice(bulk(&head)?),
        audience: Bytes::copy_from_slice(bulk(&audience)?),
        entries,
        handoff: matches!(handoff, Value::Int(1)),
    })
}

/// One stream entry `[id, [field, value, ...]]`.
pub(super) fn decode_entry(v: &Value) -> Option<Entry> {
    let Value::Array(pair) = v else { return None };
    let (id, fields) = (pair.first()?, pair.get(1)?);
    let offset = std::str::from_utf8(bulk(id)?)
        .ok()?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    let Value::Array(fields) = fields else {
        return None;
    };
    let (mut epoch, mut id, mut flags, mut raw) = (None, None, 0u8, None);
    for kv in fields.chunks(2) {
        let [k, v] = kv else { return None };
        match bulk(k)? {
            b"e" => epoch = Some(String::from_utf8_lossy(bulk(v)?).into_owned()),
            b"i" => id = Some(String::from_utf8_lossy(bulk(v)?).into_owned()),
            b"f" => flags = std::str::from_utf8(bulk(v)?).ok()?.parse().ok()?,
            b"d" => raw = Some(Bytes::copy_from_slice(bulk(v)?)),
            _ => {}
        }
    }
    Some(Entry {
        offset,
        end: flags & super::END != 0,
        handoff: flags & super::HANDOFF != 0,
        epoch: epoch?.into(),
        block: StoredEvent {
            id: id?.into(),
            has_id_field: flags & 1 != 0,
            sets_retry: flags & 2 != 0,
            raw: raw?,
            at: Instant::now(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::{decode_head, encode_head};

    #[test]
    fn a_head_survives_redis_without_its_cookies() {
        let mut head = http::Response::new(()).into_parts().0;
        head.headers
            .insert("content-type", "text/event-stream".parse().unwrap());
        head.headers
            .append("vary", "accept-language".parse().unwrap());
        head.headers.append("vary", "x-tenant".parse().unwrap());
        head.headers
            .insert("set-cookie", "s=secret".parse().unwrap());
        let back = decode_head(&encode_head(&head)).unwrap();
        assert_eq!(back.status, 200);
        assert_eq!(back.headers.get_all("vary").iter().count(), 2);
        assert!(!back.headers.contains_key("set-cookie"));
        assert!(decode_head(b"nonsense").is_none());
    }
}
