<?php
// Demo feed, written the way legacy PHP feeds are: a loop that echoes and flushes, and
// ignores Last-Event-ID. Events come in bursts of five, one a second, then seven quiet
// seconds (ssegate fills them with heartbeats). Ids count the events on a shared clock:
// burst b, position p (0-4) is event 5b+p, due at second 12b+p, so every viewer sees
// the same consecutive ids. `every=S` sends one event every S seconds instead (the
// page's test runs it fast). CORS is open so the demo page can also read the feed
// directly, without ssegate, for the side-by-side view.
header('Content-Type: text/event-stream');
header('Cache-Control: no-cache');
header('Access-Control-Allow-Origin: *');
$every = isset($_GET['every']) ? max(0.05, floatval($_GET['every'])) : 0;
for ($sent = 0; $sent < 100000; $sent++) {
    $t = microtime(true);
    if ($every > 0) {
        $n = (int)floor($t / $every) + 1;
        $at = $n * $every;
    } else {
        $b = (int)floor($t / 12);
        $p = (int)ceil($t - 12 * $b);
        if ($p >= 5) {
            $b += 1;
            $p = 0;
        }
        $at = 12 * $b + $p;
        $n = 5 * $b + $p;
    }
    if ($at > $t) {
        usleep((int)(($at - $t) * 1000000));
    }
    echo "id: $n\nevent: tick\ndata: " . json_encode(['id' => $n, 'time' => date('H:i:s', (int)$at), 'ts' => $at]) . "\n\n";
    @ob_flush();
    flush();
    if (connection_aborted()) {
        exit;
    }
    usleep(10000); // past this event's due time
}
