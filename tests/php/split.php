<?php
// Sends a fixed, awkward payload (BOM, CR/LF/CRLF endings, multi-line data, ids, a
// comment) in two writes split at byte `at`, with a pause of `pause` seconds between
// them, so a gateway that injects bytes at the wrong place would be caught.
header('Content-Type: text/event-stream');
$payload = "\xEF\xBB\xBF: hello\r\nid: a1\r\nevent: first\rdata: line one\ndata: line two\r\n\r\n"
    . "data: no id here\n\nid\ndata: id reset\r\rid: z\0z\ndata: nul id ignored\n\n"
    . "retry: 2500\ndata:  two spaces\n\n";
$at = isset($_GET['at']) ? intval($_GET['at']) : 0;
$pause = isset($_GET['pause']) ? floatval($_GET['pause']) : 0.05;
if (isset($_GET['len'])) {
    header('X-Payload-Length: ' . strlen($payload));
}
echo substr($payload, 0, $at);
@ob_flush(); flush();
usleep((int)($pause * 1000000));
echo substr($payload, $at);
@ob_flush(); flush();
