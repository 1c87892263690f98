<?php
// Events with and without ids, and an empty id that resets, then silence.
header('Content-Type: text/event-stream');
$blocks = ["id: 1\ndata: a\n\n", "data: b\n\n", "id\ndata: c\n\n", "id: 2\ndata: d\n\n", "data: e\n\n"];
foreach ($blocks as $b) {
    echo $b;
    @ob_flush(); flush();
    usleep(50000);
}
for ($i = 0; $i < 300; $i++) {
    echo ": still here\n";
    @ob_flush(); flush();
    if (connection_aborted()) exit;
    usleep(100000);
}
