<?php
// `n` events of `size` bytes of data each, sent as fast as possible, then silence. With
// `log`, records in that file when it notices the client is gone (on a write after the
// close, as PHP does). With `pause`, waits that many milliseconds after the first event
// (a client takes it before the rest comes in a flood).
header('Content-Type: text/event-stream');
ignore_user_abort(true);
$size = isset($_GET['size']) ? intval($_GET['size']) : 100000;
$n = isset($_GET['n']) ? intval($_GET['n']) : 50;
$log = isset($_GET['log']) ? $_GET['log'] : null;
$pause = isset($_GET['pause']) ? intval($_GET['pause']) : 0;
$payload = str_repeat('x', $size);
function gone($log) {
    if (!connection_aborted()) return;
    if ($log) file_put_contents($log, sprintf("%.3f\n", microtime(true)));
    exit;
}
for ($i = 1; $i <= $n; $i++) {
    echo "id: $i\ndata: $payload\n\n";
    @ob_flush(); flush();
    gone($log);
    if ($i == 1 && $pause > 0) usleep($pause * 1000);
}
for ($i = 0; $i < 300; $i++) {
    echo ": idle\n";
    @ob_flush(); flush();
    gone($log);
    usleep(100000);
}
