<?php
// A quiet stream: one event, then silence for `quiet` seconds (default 5), then a
// last event. With `partial=1` the silence falls in the middle of an event.
header('Content-Type: text/event-stream');
$quiet = isset($_GET['quiet']) ? floatval($_GET['quiet']) : 5;
echo "id: 1\ndata: first\n\n";
@ob_flush(); flush();
if (!empty($_GET['partial'])) {
    echo "id: 2\ndata: half";
    @ob_flush(); flush();
    usleep((int)($quiet * 1000000));
    echo " and half\n\n";
} else {
    usleep((int)($quiet * 1000000));
    echo "id: 2\ndata: second\n\n";
}
@ob_flush(); flush();
