// Opens N EventSource clients (the npm `eventsource` package, a spec client) on one URL,
// collects `want` events on each, and prints one JSON line:
// {"clients":[{"ids":[...],"data":[...],"times":[ms since epoch...],"errors":n}, ...]}
// Usage: node es_clients.mjs URL N WANT TIMEOUT_MS
import { EventSource } from 'eventsource';

const [url, n, want, timeoutMs] = [process.argv[2], +process.argv[3], +process.argv[4], +process.argv[5]];
const results = [];
let done = 0;

function finish() {
  // Exit only once the whole line is out: a pipe is written asynchronously.
  process.stdout.write(JSON.stringify({ clients: results }) + '\n', () => process.exit(0));
}

const timer = setTimeout(finish, timeoutMs);
for (let i = 0; i < n; i++) {
  const r = { ids: [], data: [], types: [], times: [], errors: 0 };
  results.push(r);
  const es = new EventSource(url);
  const onEvent = (ev) => {
    r.ids.push(ev.lastEventId);
    r.data.push(ev.data);
    r.types.push(ev.type);
    r.times.push(Date.now());
    if (r.data.length === want) {
      es.close();
      if (++done === n) {
        clearTimeout(timer);
        finish();
      }
    }
  };
  es.onmessage = onEvent;
  for (const t of ['first', 'tick']) es.addEventListener(t, onEvent);
  es.onerror = () => { r.errors++; };
}
