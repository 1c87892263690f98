<?php
// The gateway's own metrics for the demo page's live panel, read server-side from its
// admin listener (which serves no browser pages and no CORS): SSEGATE_ADMIN names it
// (docker-compose.yml), else 127.0.0.1 on `port` (digits only, default 9901).
header('Content-Type: text/plain');
header('Cache-Control: no-store');
$admin = getenv('SSEGATE_ADMIN');
if (!$admin) {
    $port = isset($_GET['port']) && ctype_digit($_GET['port']) ? $_GET['port'] : '9901';
    $admin = "http://127.0.0.1:$port";
}
$text = @file_get_contents("$admin/metrics", false, stream_context_create(['http' => ['timeout' => 2]]));
if ($text === false) {
    http_response_code(502);
    echo "the gateway's admin listener did not answer\n";
    exit;
}
echo $text;
