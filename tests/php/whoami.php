<?php
// A feed whose events name who asked: the Host, Cookie, Authorization, PHP session id
// and Accept-Language of the request, as this backend received them. For the replay
// isolation tests: a viewer must only ever receive events that name itself.
// Ignores Last-Event-ID, like legacy scripts. Event k is due at k * period seconds of
// wall-clock time, so every viewer sees the same consecutive ids.
// Query: period (seconds, default 0.1); session=1 (session_start(), as PHP pages do:
// Set-Cookie and Cache-Control: no-store); vary=... (sent as the Vary header);
// log=FILE (append this request's headers as one JSON line).
$h = [];
foreach (getallheaders() as $k => $v) {
    $h[strtolower($k)] = $v;
}
if (isset($_GET['log'])) {
    file_put_contents($_GET['log'], json_encode($h) . "\n", FILE_APPEND | LOCK_EX);
}
$sid = '';
if (isset($_GET['session'])) {
    session_save_path(sys_get_temp_dir());
    session_start();
    $sid = session_id();
    // Release the session lock: the visitor may reconnect while this script runs.
    session_write_close();
}
header('Content-Type: text/event-stream');
if (isset($_GET['vary'])) {
    header('Vary: ' . $_GET['vary']);
}
if (!isset($_GET['session'])) {
    header('Cache-Control: no-cache');
}
$who = [
    'host' => $h['host'] ?? '',
    'cookie' => $h['cookie'] ?? '',
    'auth' => $h['authorization'] ?? '',
    'sid' => $sid,
    'lang' => $h['accept-language'] ?? '',
];
$period = isset($_GET['period']) ? floatval($_GET['period']) : 0.1;
$k = (int)floor(microtime(true) / $period) + 1;
while (true) {
    $wait = $k * $period - microtime(true);
    if ($wait > 0) {
        usleep((int)($wait * 1000000));
    }
    echo "id: $k\ndata: " . json_encode(['k' => $k] + $who) . "\n\n";
    @ob_flush();
    flush();
    if (connection_aborted()) {
        break;
    }
    $k++;
}
