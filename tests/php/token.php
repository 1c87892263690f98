<?php
// A stream for bearer tokens, as an app behind `token_param` would serve: 401 without
// `Authorization: Bearer …`; else events every 0.1 s (ids from the clock, like
// broadcast.php) that say which token and which URI the script saw.
$headers = array_change_key_case(getallheaders(), CASE_LOWER);
$auth = isset($headers['authorization']) ? $headers['authorization'] : '';
if (strncmp($auth, 'Bearer ', 7) !== 0) {
    http_response_code(401);
    header('Content-Type: text/plain');
    echo "no bearer token\n";
    exit;
}
header('Content-Type: text/event-stream');
$who = substr($auth, 7);
$period = 0.1;
$k = (int)floor(microtime(true) / $period) + 1;
for ($sent = 0; $sent < 600; $sent++, $k++) {
    $wait = $k * $period - microtime(true);
    if ($wait > 0) {
        usleep((int)($wait * 1000000));
    }
    echo "id: $k\ndata: " . json_encode(['who' => $who, 'uri' => $_SERVER['REQUEST_URI']]) . "\n\n";
    @ob_flush();
    flush();
    if (connection_aborted()) {
        exit;
    }
}
