<?php
// A broadcast feed: event k is due at k * period seconds of wall-clock time, so every
// client sees the same consecutive ids. Ignores Last-Event-ID, like legacy scripts do.
// Query: period (seconds, default 0.1), n (events to send before ending, default 0 = run
// until the client leaves), open_delay (seconds of work before the first byte, as a
// legacy script that queries a database first; default 0).
header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');
$period = isset($_GET['period']) ? floatval($_GET['period']) : 0.1;
$n = isset($_GET['n']) ? intval($_GET['n']) : 0;
if (isset($_GET['open_delay'])) {
    usleep((int)(floatval($_GET['open_delay']) * 1000000));
}
// `log`: append one line per request to this file, so tests can count upstream requests.
if (isset($_GET['log'])) {
    file_put_contents($_GET['log'], "request\n", FILE_APPEND | LOCK_EX);
}
// `user`: put the Cookie header's user into every event (for isolation tests).
$user = isset($_COOKIE['user']) ? $_COOKIE['user'] : '';
$k = (int)floor(microtime(true) / $period) + 1;
for ($sent = 0; $n == 0 || $sent < $n; $sent++, $k++) {
    $wait = $k * $period - microtime(true);
    if ($wait > 0) {
        usleep((int)($wait * 1000000));
    }
    echo "id: $k\nevent: tick\ndata: {\"k\":$k,\"user\":\"$user\",\"t\":" . microtime(true) . "}\n\n";
    @ob_flush();
    flush();
    if (connection_aborted()) {
        break;
    }
}
