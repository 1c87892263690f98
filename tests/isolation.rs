//! Replay isolation: the replay store is a shared cache, so a viewer only ever receives
//! events recorded for a request like its own (RFC 9111 §4.1): another host, cookie,
//! bearer token, anonymous PHP session or `Vary`-listed header value is another stream.
//! Each case: viewer A reads some events and leaves (its hub lingers, still recording);
//! viewer B asks for the same path with A's last id. Real Apache + mod_php backend
//! (`whoami.php` names who asked in every event), real curl over HTTP/1.1 and h2c.

mod common;

use std::process::Command;

use common::*;

/// What one SSE request returned: the lowercased head and each event's JSON.
struct Seen {
    head: String,
    events: Vec<(u64, serde_json::Value)>,
}

impl Seen {
    fn replay(&self) -> &str {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("x-ssegate-replay: "))
            .unwrap_or("")
            .trim()
    }

    fn last_id(&self) -> u64 {
        self.events.last().map(|e| e.0).expect("events")
    }

    /// The values of one field over all events.
    fn field(&self, name: &str) -> Vec<String> {
        self.events
            .iter()
            .map(|(_, v)| v[name].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// The `Set-Cookie` lines of the head.
    fn set_cookies(&self) -> Vec<&str> {
        self.head
            .lines()
            .filter_map(|l| l.strip_prefix("set-cookie: "))
            .collect()
    }
}

fn sse(url: &str, proto: &str, headers: &[String], secs: f64) -> Seen {
    let mut args: Vec<String> = vec![
        "-s".into(),
        "-i".into(),
        "-N".into(),
        proto.into(),
        "--max-time".into(),
        secs.to_string(),
    ];
    for h in headers {
        args.push("-H".into());
        args.push(h.clone());
    }
    args.push(url.into());
    let out = Command::new("curl").args(&args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let events = parse_stream(body.as_bytes())
        .0
        .into_iter()
        .filter_map(|e| Some((e.0.parse().ok()?, serde_json::from_str(&e.2).ok()?)))
        .collect();
    Seen {
        head: head.to_ascii_lowercase(),
        events,
    }
}

/// One way two viewers differ.
struct Case {
    name: &'static str,
    /// Query of the feed (besides `period`).
    query: &'static str,
    /// The event field that names the viewer.
    field: &'static str,
    a: &'static [&'static str],
    b: &'static [&'static str],
    /// On a private route, B's events name this (`None`: B's own session, whatever it is).
    b_value: Option<&'static str>,
    /// How A comes back to its own stream, and whether that resumes.
    a_back_resumes: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "hosts",
        query: "",
        field: "host",
        a: &["Host: tenant-a.example"],
        b: &["Host: tenant-b.example"],
        b_value: Some("tenant-b.example"),
        a_back_resumes: true,
    },
    Case {
        name: "cookies",
        query: "",
        field: "cookie",
        a: &["Cookie: user=alice"],
        b: &["Cookie: user=bob"],
        b_value: Some("user=bob"),
        a_back_resumes: true,
    },
    Case {
        name: "bearer tokens",
        query: "",
        field: "auth",
        a: &["Authorization: Bearer token-of-alice"],
        b: &["Authorization: Bearer token-of-bob"],
        b_value: Some("Bearer token-of-bob"),
        a_back_resumes: true,
    },
    Case {
        name: "anonymous sessions",
        query: "&session=1",
        field: "sid",
        a: &[],
        b: &[],
        b_value: None,
        a_back_resumes: true,
    },
    Case {
        name: "Vary: Accept-Language",
        query: "&vary=Accept-Language",
        field: "lang",
        a: &["Accept-Language: de"],
        b: &["Accept-Language: fr"],
        b_value: Some("fr"),
        a_back_resumes: true,
    },
    Case {
        name: "Vary: *",
        query: "&vary=*",
        field: "lang",
        a: &[],
        b: &[],
        b_value: Some(""),
        a_back_resumes: false,
    },
];

fn owned(h: &[&str]) -> Vec<String> {
    h.iter().map(|s| s.to_string()).collect()
}

/// Records a failed expectation and goes on, so one run shows every case that leaks.
macro_rules! check {
    ($problems:ident, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            $problems.push(format!($($fmt)+));
        }
    };
}

fn run_cases(shared: bool, proto: &str) {
    let mut problems: Vec<String> = Vec::new();
    let php = Php::start();
    let mut opts = GatewayOptions::to(&php).replay("linger = \"30s\"\n");
    if shared {
        opts = opts.extra("replay = { shared = true }\n");
    }
    let gw = opts.start();
    let log = php.file("whoami.log");
    for (i, c) in CASES.iter().enumerate() {
        let url = gw.url(&format!(
            "/whoami.php?period=0.1&case={i}{}&log={}",
            c.query,
            log.display()
        ));
        let what = format!(
            "{} ({}, {proto})",
            c.name,
            if shared { "shared" } else { "private" }
        );

        let a = sse(&url, proto, &owned(c.a), 1.0);
        assert!(
            a.events.len() >= 3,
            "{what}: A got {} events",
            a.events.len()
        );
        let a_values = a.field(c.field);
        let a_value = a_values[0].clone();
        let k = a.last_id();
        // A's hub lingers and records while B asks for what A missed.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut b_headers = owned(c.b);
        b_headers.push(format!("Last-Event-ID: {k}"));
        let b = sse(&url, proto, &b_headers, 1.0);
        let b_values = b.field(c.field);
        check!(
            problems,
            b.events.len() >= 3,
            "{what}: B got {} events",
            b.events.len()
        );

        // Never A's Set-Cookie, whatever the route.
        for cookie in a.set_cookies() {
            check!(
                problems,
                !b.head.contains(cookie),
                "{what}: B got A's {cookie}\n{}",
                b.head
            );
        }
        // (On a shared route the session is the one PHP opened for the gateway's
        // anonymous request: A never held its cookie, so it is not A's.)
        let a_owns_value = !(shared && c.field == "sid");
        if a_owns_value && !a_value.is_empty() && c.b_value != Some(a_value.as_str()) {
            check!(
                problems,
                !b_values.contains(&a_value),
                "{what}: B received A's events: {b_values:?}"
            );
        }
        if shared {
            // The shared stream is what an anonymous request gets: no cookie, no token.
            for v in [&a, &b] {
                check!(problems, v.set_cookies().is_empty(), "{what}: {}", v.head);
            }
        } else {
            check!(problems, b.replay() == "miss", "{what}: B: {}", b.head);
            match c.b_value {
                Some(want) => check!(
                    problems,
                    b_values.iter().all(|v| v == want),
                    "{what}: B's events name {b_values:?}, not {want:?}"
                ),
                None => check!(
                    problems,
                    b_values.iter().all(|v| !v.is_empty() && *v != a_value),
                    "{what}: B's events name {b_values:?} (A was {a_value:?})"
                ),
            }
        }

        // A comes back with what it had (the session cookie it was given, if any).
        let mut back_headers = owned(c.a);
        if c.field == "sid" && !shared {
            back_headers.push(format!("Cookie: PHPSESSID={a_value}"));
        }
        back_headers.push(format!("Last-Event-ID: {k}"));
        let back = sse(&url, proto, &back_headers, 0.6);
        if c.a_back_resumes {
            check!(
                problems,
                back.replay().starts_with("hit"),
                "{what}: A back: {}",
                back.head
            );
            check!(
                problems,
                back.events.first().map(|e| e.0) == Some(k + 1),
                "{what}: A back starts at {:?}, not {}",
                back.events.first().map(|e| e.0),
                k + 1
            );
            check!(
                problems,
                back.set_cookies().is_empty(),
                "{what}: {}",
                back.head
            );
            if !shared {
                check!(
                    problems,
                    back.field(c.field).iter().all(|v| *v == a_value),
                    "{what}: A back got {:?}",
                    back.field(c.field)
                );
            }
        } else {
            check!(
                problems,
                back.replay() == "miss",
                "{what}: A back: {}",
                back.head
            );
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    let seen = std::fs::read_to_string(&log).expect("backend log");
    if shared {
        // The backend never saw a client's identity on a shared route.
        for line in seen.lines() {
            let h: serde_json::Value = serde_json::from_str(line).expect("json");
            assert!(
                h.get("cookie").is_none() && h.get("authorization").is_none(),
                "{line}"
            );
        }
    }
    let m = gw.log();
    assert!(
        m.contains("replay_miss"),
        "access log names why a resume missed"
    );
}

#[test]
fn private_route_over_http1() {
    run_cases(false, "--http1.1");
}

#[test]
fn private_route_over_h2c() {
    run_cases(false, "--http2-prior-knowledge");
}

#[test]
fn shared_route_over_http1() {
    run_cases(true, "--http1.1");
}

#[test]
fn shared_route_over_h2c() {
    run_cases(true, "--http2-prior-knowledge");
}

/// `token_param`: an `EventSource` cannot set headers, so the app puts its token in the
/// query. The gateway moves it into `Authorization: Bearer …`, out of the URI the
/// upstream sees and of the access log; the token is then the stream's identity, so
/// another token with a seen id is never resumed from the first one's history.
#[test]
fn a_query_token_becomes_the_authorization_identity() {
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .replay("linger = \"30s\"\n")
        .extra("token_param = \"access_token\"\n")
        .start();
    let url = |token: &str| gw.url(&format!("/token.php?room=7&access_token={token}&x=%2F"));
    let h1 = "--http1.1";
    let alice = sse(&url("alice%2Bsecret"), h1, &[], 0.8);
    assert!(!alice.events.is_empty(), "{}", alice.head);
    assert!(alice.field("who").iter().all(|w| w == "alice+secret"));
    // The upstream saw the rest of the query as it came, without the token.
    assert!(
        alice
            .field("uri")
            .iter()
            .all(|u| u == "/token.php?room=7&x=%2F"),
        "{:?}",
        alice.field("uri")
    );
    let k = alice.last_id();
    // Bob, with Alice's id: another identity, so another stream (a miss).
    let bob = sse(&url("bob"), h1, &[format!("Last-Event-ID: {k}")], 0.8);
    assert_eq!(bob.replay(), "miss", "{}", bob.head);
    assert!(bob.field("who").iter().all(|w| w == "bob"));
    // Alice resumes from her own history.
    let back = sse(
        &url("alice%2Bsecret"),
        h1,
        &[format!("Last-Event-ID: {k}")],
        0.8,
    );
    assert!(back.replay().starts_with("hit"), "{}", back.head);
    assert_eq!(back.events.first().map(|e| e.0), Some(k + 1));
    // A request's own Authorization header wins; the parameter still goes.
    let own = sse(
        &url("alice%2Bsecret"),
        h1,
        &["Authorization: Bearer carol".into()],
        0.5,
    );
    assert!(own.field("who").iter().all(|w| w == "carol"));
    assert!(own.field("uri").iter().all(|u| !u.contains("access_token")));
    // Without a token the upstream says so itself.
    let none = sse(&gw.url("/token.php?room=7"), h1, &[], 0.5);
    assert!(none.head.starts_with("http/1.1 401"), "{}", none.head);
    // No token in the access log.
    assert!(wait_for(|| gw.log().matches("kind=\"stream\"").count() >= 4));
    let log = gw.log();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ssegate::access"))
        .collect();
    assert!(access.len() >= 4, "{log}");
    for l in access {
        assert!(!l.contains("access_token") && !l.contains("secret"), "{l}");
    }
}
