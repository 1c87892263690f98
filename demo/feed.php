<?php
// Demo feed, written the way legacy PHP feeds are: a loop that echoes and flushes.
// Event ids follow the wall clock (one per second), so every client sees the same ids.
// After 5 events it goes quiet for 7 seconds (ssegate fills the silence with
// heartbeats), sends 5 more, and ends: the browser then reconnects by itself.
header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');
echo "retry: 2000\n\n";
$burst = function () {
    for ($i = 0; $i < 5; $i++) {
        $k = (int)floor(microtime(true)) + 1;
        usleep((int)(($k - microtime(true)) * 1000000));
        echo "id: $k\nevent: tick\ndata: " . json_encode(['id' => $k, 'time' => date('H:i:s', $k)]) . "\n\n";
        @ob_flush();
        flush();
    }
};
$burst();
sleep(7);
$burst();
