//! The Lua scripts that make each step on a stream's Redis keys atomic.
//!
//! Keys of one stream (all under one hash tag, so a Redis Cluster keeps them together):
//! `s` the history (a Redis stream; entry id `<offset>-0`, fields `e` epoch, `i` event
//! id, `f` flags, `d` raw block, `t` ms time), `m` the meta hash (`e` epoch, `o` top
//! offset, `b` bytes held, `n` entries held, `h` response head, `a` audience fingerprint, `x` the lease value of a
//! reader that announced a handoff), `l` the reader's
//! lease (`<node>/<pid>/<token>`), `w` set while other nodes' clients follow the stream.
//!
//! The model is Centrifugo's: the offset is assigned by the store in the same step as
//! the write, and the epoch changes whenever history may have been lost (the meta key
//! was gone, or the writer could not vouch that nothing was missed since its last
//! write), so a resume never silently crosses a hole.

use std::sync::LazyLock;

use redis::Script;

/// Appends blocks to one or more streams, each fenced by its own lease: the node's
/// pending appends go to Redis as one call (see `batch`), so the script's fixed cost and
/// the clock read are paid once per batch, not once per stream.
/// KEYS: s, m, l of each stream in turn. ARGV, a section per stream in the same order:
/// lease value, previous offset ("" when the writer cannot vouch for continuity), new
/// epoch, max events, max bytes, max age ms, key ttl ms, block count n, then (id, flags,
/// raw) for each of the n blocks. Returns one answer per stream: {0} when fenced, else
/// {1, top offset, epoch, reset}.
///
/// Per stream in the common case: GET, HMGET, XADD per block, HSET (the meta hash counts
/// the entries, `n`, so no XLEN; a new lease holder counts once). The age bound and the keys' expiry are refreshed every
/// 32 offsets (and on a new epoch): both are minutes long, so that is soon enough and
/// keeps each event cheap.
///
/// Several streams' keys in one call is fine on one Redis (the connection manager speaks
/// to one server); a Redis Cluster would need one call per hash slot.
pub static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {}
local a = 1
for k = 1, #KEYS, 3 do
  local s, mk = KEYS[k], KEYS[k + 1]
  local blocks = tonumber(ARGV[a + 7])
  local next_a = a + 8 + 3 * blocks
  if redis.call('GET', KEYS[k + 2]) ~= ARGV[a] then
    out[#out + 1] = {0}
  else
    local m = redis.call('HMGET', mk, 'e', 'o', 'b', 'n')
    local epoch, offset, bytes = m[1], tonumber(m[2] or '0'), tonumber(m[3] or '0')
    local n = tonumber(m[4] or '-1')
    local reset = 0
    if (not epoch) or ARGV[a + 1] == '' or tonumber(ARGV[a + 1]) ~= offset then
      epoch = ARGV[a + 2]; bytes = 0; n = 0; reset = 1
      redis.call('DEL', s)
    elseif n < 0 then
      n = redis.call('XLEN', s)
    end
    local max_len, max_bytes, max_age = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    local first_offset = offset
    for i = a + 8, next_a - 1, 3 do
      local raw = ARGV[i + 2]
      offset = offset + 1
      if #raw > max_bytes or max_len == 0 then
        -- Too big to keep: nothing before it may be resumed across it.
        redis.call('DEL', s); bytes = 0; n = 0
      else
        redis.call('XADD', s, offset .. '-0', 'e', epoch, 'i', ARGV[i], 'f', ARGV[i + 1], 'd', raw, 't', ms)
        bytes = bytes + #raw; n = n + 1
      end
      -- A handoff announced: a follower that comes later learns it from PEEK.
      if ARGV[i + 1] == '8' then redis.call('HSET', mk, 'x', ARGV[a]) end
    end
    local aged = reset == 1 or math.floor(offset / 32) ~= math.floor(first_offset / 32)
    while n > 0 do
      local over = n > max_len or bytes > max_bytes
      if not over and not aged then break end
      local first = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)[1]
      if not first then n = 0; break end
      local f = first[2]
      if over or tonumber(f[10]) < ms - max_age then
        redis.call('XDEL', s, first[1]); bytes = bytes - #f[8]; n = n - 1
      else
        break
      end
    end
    redis.call('HSET', mk, 'e', epoch, 'o', offset, 'b', bytes, 'n', n)
    if aged then
      redis.call('PEXPIRE', s, ARGV[a + 6]); redis.call('PEXPIRE', mk, ARGV[a + 6])
    end
    out[#out + 1] = {1, offset, epoch, reset}
  end
  a = next_a
end
return out
"#,
    )
});

/// Reads a stream's state. KEYS: s, m, l. ARGV: "1" to include the history.
/// Returns {lease, epoch, top offset, head, audience, entries, handoff}: `handoff` is 1
/// when the current reader has announced a handoff (it is about to exit).
pub static PEEK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local m = redis.call('HMGET', KEYS[2], 'e', 'o', 'h', 'a', 'x')
local entries = {}
if ARGV[1] == '1' then entries = redis.call('XRANGE', KEYS[1], '-', '+') end
local lease = redis.call('GET', KEYS[3]) or ''
local handoff = 0
if lease ~= '' and m[5] == lease then handoff = 1 end
return {lease, m[1] or '', m[2] or '0', m[3] or '', m[4] or '', entries, handoff}
"#,
    )
});

/// Takes the lease if nobody holds it. KEYS: l, m, s. ARGV: value, ms.
/// Returns {taken, epoch, top offset, last event id}: where the history stands for the
/// new reader (the id of its newest block, markers skipped).
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  -- The entry count is the holder's bookkeeping: the new one counts afresh (a node of
  -- another version may have written without it).
  redis.call('HDEL', KEYS[2], 'n')
  local m = redis.call('HMGET', KEYS[2], 'e', 'o')
  local last = ''
  for _, e in ipairs(redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 8)) do
    if tonumber(e[2][6]) < 4 then last = e[2][4]; break end
  end
  return {1, m[1] or '', m[2] or '0', last}
end
return {0, '', '0', ''}
"#,
    )
});

/// Records what every node answers a follower with. KEYS: l, m. ARGV: lease value,
/// head, audience, ttl ms. Returns 0 when fenced.
pub static OPEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'h', ARGV[2], 'a', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"#,
    )
});

/// Extends the lease if still held. KEYS: l. ARGV: value, ms. Returns 0 when lost.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#,
    )
});

/// The reader is done with a stream (its upstream ended, or it shuts down): an end
/// marker (flags 4, no block; a planned handoff is announced before by flags 8) tells followers at once to take the upstream over, and
/// the lease goes. KEYS: s, m, l. ARGV: lease value. Returns 0 when fenced.
pub static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 0 end
local m = redis.call('HMGET', KEYS[2], 'e', 'o', 'n')
if m[1] then
  local offset = tonumber(m[2] or '0') + 1
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('XADD', KEYS[1], offset .. '-0', 'e', m[1], 'i', '', 'f', 4, 'd', '', 't', ms)
  redis.call('HSET', KEYS[2], 'o', offset)
  if m[3] then redis.call('HSET', KEYS[2], 'n', tonumber(m[3]) + 1) end
end
redis.call('DEL', KEYS[3])
return 1
"#,
    )
});

/// Gives the lease up if still held. KEYS: l. ARGV: value.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});
