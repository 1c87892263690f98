// A WebSocket echo backend (npm `ws`), for the upgrade pass-through test.
// Usage: node ws_echo.mjs PORT ; prints "listening" when ready.
import { WebSocketServer } from 'ws';
const wss = new WebSocketServer({ host: '127.0.0.1', port: +process.argv[2] });
wss.on('connection', (ws, req) => {
  ws.send(`hello ${req.headers['x-forwarded-for'] || '-'}`);
  ws.on('message', (m) => ws.send(`echo ${m}`));
});
wss.on('listening', () => console.log('listening'));
