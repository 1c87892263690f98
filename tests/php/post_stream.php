<?php
// An LLM-style token stream answered to a POST (as fetch() clients send), with no
// Accept header needed: echoes the posted prompt back word by word, then [DONE].
header('Content-Type: Text/Event-Stream; charset=utf-8');
$body = file_get_contents('php://input');
$words = preg_split('/\s+/', trim($body));
$pause = isset($_GET['pause']) ? floatval($_GET['pause']) : 0.05;
foreach ($words as $w) {
    echo "data: " . json_encode(['token' => $w]) . "\n\n";
    @ob_flush(); flush();
    usleep((int)($pause * 1000000));
}
echo "data: [DONE]\n\n";
