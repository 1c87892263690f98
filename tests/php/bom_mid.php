<?php
// A stream with a block that starts with a BOM mid-stream: an unknown field that every
// client ignores, unless it becomes the very first bytes of a response (then the BOM is
// stripped and the line reads as an `id` field).
header('Content-Type: text/event-stream');
echo "id: 1\ndata: a\n\n";
echo "\xEF\xBB\xBFid: evil\ndata: b\n\n";
@ob_flush();
flush();
sleep(5);
