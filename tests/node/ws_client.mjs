// Connects to a WebSocket URL, sends "ping 1".."ping N", prints every message received
// as a JSON array once N echoes are back. Usage: node ws_client.mjs URL N
import WebSocket from 'ws';
const [url, n] = [process.argv[2], +process.argv[3]];
const got = [];
const ws = new WebSocket(url);
const timer = setTimeout(() => { console.log(JSON.stringify(got)); process.exit(1); }, 10000);
ws.on('open', () => { for (let i = 1; i <= n; i++) ws.send(`ping ${i}`); });
ws.on('message', (m) => {
  got.push(m.toString());
  if (got.length === n + 1) { clearTimeout(timer); console.log(JSON.stringify(got)); ws.close(); }
});
ws.on('error', (e) => { console.error(String(e)); process.exit(2); });
