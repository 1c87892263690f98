<?php
// A backend that honours Last-Event-ID, sloppily: it replays from that id itself
// (inclusive), then counts on. Ids are consecutive numbers, one event every 0.1 s.
header('Content-Type: text/event-stream');
$last = isset($_SERVER['HTTP_LAST_EVENT_ID']) ? intval($_SERVER['HTTP_LAST_EVENT_ID']) : 0;
for ($i = max(1, $last); $i < max(1, $last) + 100; $i++) {
    echo "id: $i\ndata: n$i\n\n";
    @ob_flush(); flush();
    if (connection_aborted()) exit;
    usleep(100000);
}
