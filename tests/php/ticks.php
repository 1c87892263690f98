<?php
// Ticks every `interval` seconds (default 0.2) and records, in the file named by `log`,
// when it notices the client is gone. PHP notices only on a write after the close.
header('Content-Type: text/event-stream');
ignore_user_abort(true);
$interval = isset($_GET['interval']) ? floatval($_GET['interval']) : 0.2;
$log = isset($_GET['log']) ? $_GET['log'] : null;
for ($i = 1; $i <= 600; $i++) {
    echo "id: $i\ndata: tick $i\n\n";
    @ob_flush();
    flush();
    if (connection_aborted()) {
        if ($log) {
            file_put_contents($log, sprintf("%.3f\n", microtime(true)));
        }
        exit;
    }
    usleep((int)($interval * 1000000));
}
