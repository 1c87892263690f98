<?php
// An ordinary (non-stream) endpoint: answers with what it received, as JSON.
header('Content-Type: application/json');
$headers = [];
foreach (getallheaders() as $k => $v) {
    $headers[strtolower($k)] = $v;
}
if (isset($_GET['status'])) {
    http_response_code(intval($_GET['status']));
}
if (isset($_GET['sleep'])) {
    usleep((int)(floatval($_GET['sleep']) * 1000000));
}
echo json_encode([
    'method' => $_SERVER['REQUEST_METHOD'],
    'uri' => $_SERVER['REQUEST_URI'],
    'headers' => $headers,
    'body' => file_get_contents('php://input'),
]);
