<?php
// Opens an event and never finishes its line: `chunk` more bytes every `every` seconds.
header('Content-Type: text/event-stream');
$chunk = isset($_GET['chunk']) ? intval($_GET['chunk']) : 10000;
$every = isset($_GET['every']) ? floatval($_GET['every']) : 0.05;
echo "id: 1\ndata: first\n\ndata: ";
@ob_flush(); flush();
for ($i = 0; $i < 2000; $i++) {
    echo str_repeat('x', $chunk);
    @ob_flush(); flush();
    if (connection_aborted()) exit;
    usleep((int)($every * 1000000));
}
