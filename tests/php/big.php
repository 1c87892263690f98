<?php
// `n` events of `size` bytes of data each, sent as fast as possible, then silence.
header('Content-Type: text/event-stream');
$size = isset($_GET['size']) ? intval($_GET['size']) : 100000;
$n = isset($_GET['n']) ? intval($_GET['n']) : 50;
$payload = str_repeat('x', $size);
for ($i = 1; $i <= $n; $i++) {
    echo "id: $i\ndata: $payload\n\n";
    @ob_flush(); flush();
}
for ($i = 0; $i < 300; $i++) {
    echo ": idle\n";
    @ob_flush(); flush();
    if (connection_aborted()) exit;
    usleep(100000);
}
