<?php
// A naive legacy SSE script, as found in the wild: prints events in a loop and pushes
// them out with ob_flush()/flush(). Ignores Last-Event-ID.
// Query: n (events, default 10), interval (seconds, default 0.1).
header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');
$n = isset($_GET['n']) ? intval($_GET['n']) : 10;
$interval = isset($_GET['interval']) ? floatval($_GET['interval']) : 0.1;
for ($i = 1; $i <= $n; $i++) {
    echo "id: $i\n";
    echo "data: " . json_encode(['i' => $i, 't' => microtime(true)]) . "\n\n";
    @ob_flush();
    flush();
    if ($i < $n) {
        usleep((int)($interval * 1000000));
    }
}
