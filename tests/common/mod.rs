//! Test harness: a real PHP backend (`php -S` with workers) serving `tests/php`, the real
//! `ssegate` binary with a generated config, and helpers to drive real clients (curl,
//! node's `eventsource`). Everything listens on 127.0.0.1 with ports the OS picks.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`. A port from
/// [`free_port`] may be taken by another test's server before ours binds it; a connect
/// would then succeed against that other server.
pub fn owns_listener(pid: u32, port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return true; // no /proc: nothing to check against
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| format!("socket:[{i}]")))?
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
}

/// Waits until `child` itself listens on each of `ports`; false if it exited or another
/// process holds one of them (the caller then tries other ports).
pub fn wait_own_ports(ports: &[u16], child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if ports.iter().all(|&p| owns_listener(child.id(), p)) {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The legacy backend: Apache (prefork) with mod_php serving a copy of `tests/php`,
/// as the production sites ssegate fronts. Each process serves one connection at a
/// time, so long streams never queue behind each other (as they can with `php -S`).
pub struct Php {
    pub port: u16,
    /// Document root and log folder, writable by the Apache user (for scripts' logs).
    pub dir: tempfile::TempDir,
    proc: Option<Child>,
}

fn php_module() -> PathBuf {
    let dir = Path::new("/usr/lib/apache2/modules");
    std::fs::read_dir(dir)
        .ok()
        .and_then(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libphp") && n.ends_with(".so"))
            })
        })
        .expect("mod_php (the README's test command installs apache2 and libapache2-mod-php)")
}

impl Php {
    /// Apache serving the test scripts, `tests/php`.
    pub fn start() -> Php {
        Self::serving(&repo().join("tests/php"))
    }

    /// Apache serving a copy of the files in `src` (`tests/php`, or `demo`).
    pub fn serving(src: &Path) -> Php {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("www");
        std::fs::create_dir(&root).expect("mkdir");
        for entry in std::fs::read_dir(src).expect("scripts") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), root.join(entry.file_name())).expect("copy script");
        }
        set_mode(dir.path(), 0o777);
        set_mode(&root, 0o755);
        for _ in 0..5 {
            if let Some((port, child)) = Self::try_start(&dir) {
                return Php {
                    port,
                    dir,
                    proc: Some(child),
                };
            }
        }
        panic!("apache2 did not start on a port of its own in 5 tries");
    }

    /// Apache on a fresh port, if it gets that port.
    fn try_start(dir: &tempfile::TempDir) -> Option<(u16, Child)> {
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {d}/httpd.pid
Mutex file:{d} default
ErrorLog {d}/error.log
LogLevel warn
User nobody
Group nogroup
LoadModule mpm_prefork_module /usr/lib/apache2/modules/mod_mpm_prefork.so
LoadModule authz_core_module /usr/lib/apache2/modules/mod_authz_core.so
LoadModule mime_module /usr/lib/apache2/modules/mod_mime.so
LoadModule php_module {php}
TypesConfig /etc/mime.types
StartServers 16
MinSpareServers 16
MaxSpareServers 64
ServerLimit 400
MaxRequestWorkers 400
KeepAlive On
DocumentRoot {d}/www
<Directory {d}/www>
  Require all granted
</Directory>
<FilesMatch "\.php$">
  SetHandler application/x-httpd-php
</FilesMatch>
"#,
            php = php_module().display()
        );
        let conf_path = dir.path().join("httpd.conf");
        std::fs::write(&conf_path, conf).expect("write httpd.conf");
        let mut child = Command::new("apache2")
            .process_group(0)
            .arg("-f")
            .arg(&conf_path)
            .arg("-DFOREGROUND")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run apache2 (the README's test command installs it)");
        if !wait_own_ports(&[port], &mut child) {
            kill_group(&mut child);
            return None;
        }
        wait_port(port, &mut child, "apache2");
        Some((port, child))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// A file in the backend's writable folder (scripts log there).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Php {
    fn drop(&mut self) {
        if let Some(mut child) = self.proc.take() {
            kill_group(&mut child);
        }
    }
}

/// Apache and nginx run in their own process groups: kill the parent and every child at
/// once, so no worker outlives the test.
pub fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A self-signed certificate for 127.0.0.1 and localhost, written to `dir`.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCert {
    pub fn generate(dir: &Path) -> TestCert {
        Self::for_names(dir, "cert", &["localhost", "127.0.0.1"])
    }

    /// A self-signed certificate for `names`, written to `dir` as `stem.pem`/`stem.key`.
    pub fn for_names(dir: &Path, stem: &str, names: &[&str]) -> TestCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("generate a certificate");
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        TestCert { cert, key }
    }
}

/// An `openssl s_server` that accepts TLS 1.1 and every legacy suite with `cert`: the
/// control for checks that ssegate refuses them (a probe that fails here too could
/// never fail against ssegate). Returns it and its port.
pub fn permissive_tls_server(cert: &TestCert) -> (Proc, u16) {
    let port = free_port();
    let mut child = Command::new("openssl")
        .args(["s_server", "-www", "-min_protocol", "TLSv1.1"])
        .args(["-cipher", "ALL:@SECLEVEL=0", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&cert.cert)
        .arg("-key")
        .arg(&cert.key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_server");
    wait_port(port, &mut child, "openssl s_server");
    (Proc { child }, port)
}

/// The real gateway binary with a generated config.
pub struct Gateway {
    pub port: u16,
    pub admin_port: Option<u16>,
    pub tls_port: Option<u16>,
    pub dir: tempfile::TempDir,
    pub proc: Proc,
    pub cert: Option<TestCert>,
}

pub struct GatewayOptions {
    /// Extra TOML appended to the generated file (sections such as `[sse]`).
    pub extra: String,
    /// Upstream servers (host:port).
    pub servers: Vec<String>,
    /// Also listen with TLS.
    pub tls: bool,
    /// `[upstreams]` keys beyond name and servers.
    pub upstream_extra: String,
    /// Body of the `[limits]` section. Tests not about limits turn the rates off, since
    /// they open streams and requests faster than any client should.
    pub limits: String,
    /// Body of the `[replay]` section. Tests not about replay close upstreams as soon
    /// as their client leaves (no linger), as before hubs existed: `php -S` workers
    /// serve one stream each and would otherwise stay busy.
    pub replay: String,
    /// Serve the admin endpoints on a port of their own.
    pub admin: bool,
    /// More `[server]` keys.
    pub server_extra: String,
    /// More keys inside the TLS listener's inline `tls = { ... }` table.
    pub tls_extra: String,
    /// Environment variables for the gateway process.
    pub env: Vec<(String, String)>,
}

impl GatewayOptions {
    pub fn to(php: &Php) -> GatewayOptions {
        Self::to_servers(vec![format!("127.0.0.1:{}", php.port)])
    }

    pub fn to_servers(servers: Vec<String>) -> GatewayOptions {
        GatewayOptions {
            extra: String::new(),
            servers,
            tls: false,
            upstream_extra: String::new(),
            limits: "request_rate = 0\nstream_connect_rate = 0\n".into(),
            replay: "linger = \"0s\"\n".into(),
            admin: false,
            server_extra: String::new(),
            tls_extra: String::new(),
            env: Vec::new(),
        }
    }

    pub fn server(mut self, toml: &str) -> Self {
        self.server_extra.push_str(toml);
        self
    }

    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    pub fn replay(mut self, toml: &str) -> Self {
        self.replay = toml.into();
        self
    }

    pub fn limits(mut self, toml: &str) -> Self {
        self.limits = toml.into();
        self
    }

    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// A TLS listener with more keys in its `tls` table (`sni = [...]`).
    pub fn tls_with(mut self, keys: &str) -> Self {
        self.tls = true;
        self.tls_extra = keys.into();
        self
    }

    pub fn start(self) -> Gateway {
        Gateway::start(self)
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ssegate")
}

impl Gateway {
    pub fn start(o: GatewayOptions) -> Gateway {
        for _ in 0..5 {
            if let Some(gw) = Self::try_start(&o) {
                return gw;
            }
        }
        panic!("ssegate did not start on ports of its own in 5 tries");
    }

    /// The gateway on fresh ports, if it gets them all.
    fn try_start(o: &GatewayOptions) -> Option<Gateway> {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut toml = format!(
            "[server]\nthreads = 2\ngrace_period = \"10s\"\nlog_level = \"info\"\npid_file = \"{}\"\nupgrade_sock = \"{}\"\n\n[[listeners]]\naddress = \"127.0.0.1:{port}\"\n",
            dir.path().join("ssegate.pid").display(),
            dir.path().join("upgrade.sock").display(),
        );
        toml = toml.replacen("[server]\n", &format!("[server]\n{}", o.server_extra), 1);
        let admin_port = o.admin.then(free_port);
        if let Some(p) = admin_port {
            toml = toml.replacen(
                "[server]\n",
                &format!("[server]\nadmin_address = \"127.0.0.1:{p}\"\n"),
                1,
            );
        }
        let mut tls_port = None;
        let mut cert = None;
        if o.tls {
            let c = TestCert::generate(dir.path());
            let p = free_port();
            toml.push_str(&format!(
                "\n[[listeners]]\naddress = \"127.0.0.1:{p}\"\ntls = {{ cert = \"{}\", key = \"{}\"{} }}\n",
                c.cert.display(),
                c.key.display(),
                o.tls_extra
            ));
            tls_port = Some(p);
            cert = Some(c);
        }
        let servers: Vec<String> = o.servers.iter().map(|s| format!("\"{s}\"")).collect();
        toml.push_str(&format!(
            "\n[replay]\n{}\n\n[limits]\n{}\n\n[[upstreams]]\nname = \"php\"\nservers = [{}]\n{}\n\n[[routes]]\nupstream = \"php\"\n\n{}\n",
            o.replay,
            o.limits,
            servers.join(", "),
            o.upstream_extra,
            o.extra
        ));
        let conf = dir.path().join("ssegate.toml");
        std::fs::write(&conf, toml).expect("write config");
        let log = std::fs::File::create(dir.path().join("ssegate.log")).expect("log file");
        let mut child = Command::new(bin())
            .envs(o.env.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run ssegate");
        let ports: Vec<u16> = [Some(port), tls_port, admin_port]
            .into_iter()
            .flatten()
            .collect();
        if !wait_own_ports(&ports, &mut child) {
            let log = std::fs::read_to_string(dir.path().join("ssegate.log")).unwrap_or_default();
            eprintln!("ssegate did not get its ports {ports:?}; trying others:\n{log}");
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        for p in ports {
            wait_port(p, &mut child, "ssegate");
        }
        // Those probes were connections too: a test that counts connections starts once
        // the gateway has counted them out (on a busy machine it may not have yet).
        if let Some(a) = admin_port {
            assert!(
                wait_for(|| admin_metric(a, "ssegate_connections_open") == 0.0),
                "the start-up probes' connections are still counted"
            );
        }
        Some(Gateway {
            port,
            admin_port,
            tls_port,
            dir,
            proc: Proc { child },
            cert,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn tls_url(&self, path: &str) -> String {
        format!(
            "https://localhost:{}{}",
            self.tls_port.expect("tls listener"),
            path
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ssegate.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.proc.child.id() as i32
    }

    /// Sends a signal by name (TERM, HUP, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// A graceful upgrade: starts a new process on the same config with `--upgrade`,
    /// waits until it listens on the upgrade socket, then sends SIGQUIT to the running
    /// one. The new process becomes `self.proc`; the old one is returned (to wait on).
    pub fn upgrade(&mut self) -> Proc {
        let sock = self.dir.path().join("upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(self.dir.path().join("ssegate-new.log")).expect("log");
        let child = Command::new(bin())
            .arg("-u")
            .arg("-c")
            .arg(self.dir.path().join("ssegate.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run ssegate -u");
        assert!(
            wait_for(|| sock.exists()),
            "the new process never opened its upgrade socket"
        );
        self.signal("QUIT");
        std::mem::replace(&mut self.proc, Proc { child })
    }

    /// The upgraded-to process's log (see [`Gateway::upgrade`]).
    pub fn new_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ssegate-new.log")).unwrap_or_default()
    }

    /// Waits for the process to exit; returns how long it took, or None on timeout.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.proc.child.try_wait() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A line of output and when it arrived.
#[derive(Debug, Clone)]
pub struct TimedLine {
    pub at: std::time::SystemTime,
    pub line: String,
}

/// Runs curl with `args` (plus `-sS -N`) and returns its stdout split into lines, each
/// stamped with its arrival time.
pub fn curl_lines(args: &[&str]) -> Vec<TimedLine> {
    let mut child = Command::new("curl")
        .args(["-sS", "-N"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run curl");
    let out = child.stdout.take().expect("stdout");
    let mut lines = vec![];
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        lines.push(TimedLine {
            at: std::time::SystemTime::now(),
            line,
        });
    }
    let _ = child.wait();
    lines
}

/// Runs curl and returns (status, stdout bytes).
pub fn curl(args: &[&str]) -> (std::process::ExitStatus, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-sS"])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run curl");
    (out.status, out.stdout)
}

/// Runs curl with `args` (the URL among them) and returns the response's status code
/// only ("000" when there was no response), the body thrown away.
pub fn http_code(args: &[&str]) -> String {
    let (_, out) = curl(&[args, &["-o", "/dev/null", "-w", "%{http_code}"]].concat());
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads everything a spawned process prints, with a time limit.
pub fn read_all_with_limit(mut child: Child, limit: Duration) -> Vec<u8> {
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![];
        let _ = out.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    let buf = rx.recv_timeout(limit).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    buf
}

/// What a client sees of one event: (id, type, data, retry).
pub type SeenEvent = (String, String, String, Option<u64>);

/// Parses a whole event stream with the gateway's parser (tested against the spec in
/// its own unit suite): (id, type, data, retry) per event, then the final last id.
pub fn parse_stream(bytes: &[u8]) -> (Vec<SeenEvent>, String) {
    let mut p = ssegate::sse::Parser::default();
    p.push(bytes);
    let mut out = vec![];
    while let Some(e) = p.next_event().expect("parse") {
        out.push((e.id, e.event_type, e.data, e.retry));
    }
    (out, p.last_event_id().to_owned())
}

/// Median and maximum of a list of durations, in milliseconds.
pub fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let med = v.get(v.len() / 2).copied().unwrap_or(f64::NAN);
    let max = v.last().copied().unwrap_or(f64::NAN);
    (med, max)
}

/// Polls `cond` for up to 5 s.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Runs `n` npm `eventsource` clients on `url` until each has `want` events (or
/// `timeout_ms` passes); returns their report (`tests/node/es_clients.mjs`).
pub fn node_clients(
    url: &str,
    n: usize,
    want: usize,
    timeout_ms: u64,
    extra_ca: Option<&Path>,
) -> serde_json::Value {
    assert!(
        repo().join("tests/node/node_modules/eventsource").exists(),
        "tests/node/node_modules is missing: run the README's test command (scripts/test), which installs it"
    );
    let mut cmd = Command::new("node");
    cmd.arg(repo().join("tests/node/es_clients.mjs"))
        .args([
            url,
            &n.to_string(),
            &want.to_string(),
            &timeout_ms.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(ca) = extra_ca {
        cmd.env("NODE_EXTRA_CA_CERTS", ca);
    }
    let out = cmd.output().expect("run node");
    assert!(out.status.success(), "node client failed");
    serde_json::from_slice(&out.stdout).expect("client JSON")
}

/// The numeric event ids a JS client reported in its `ids` array.
pub fn json_ids(v: &serde_json::Value) -> Vec<u64> {
    v["ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i.as_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Starts curl reading a stream (`-N`, at most `max_secs`), with extra curl arguments
/// (headers...) before the URL; its stdout is piped for `read_all_with_limit`.
pub fn curl_stream(url: &str, max_secs: u32, extra: &[&str]) -> Child {
    Command::new("curl")
        .args(["-sS", "-N", "--max-time", &max_secs.to_string()])
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl")
}

/// A metric's value in Prometheus text: `name` alone sums every label set of it,
/// `name{labels}` is that one series; 0 when absent.
pub fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(series)?;
            // `ssegate_hubs` must not match `ssegate_hubs_lingering`.
            let value = if series.ends_with('}') {
                rest
            } else if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// A metric's value read from the admin listener on `port` (see [`metric_in`]).
pub fn admin_metric(port: u16, series: &str) -> f64 {
    let (_, m) = curl(&[&format!("http://127.0.0.1:{port}/metrics")]);
    metric_in(&String::from_utf8_lossy(&m), series)
}

/// What one SSE request returned: the lowercased head and the events.
pub struct Seen {
    pub head: String,
    pub events: Vec<SeenEvent>,
}

impl Seen {
    pub fn ids(&self) -> Vec<u64> {
        self.events
            .iter()
            .filter_map(|e| e.0.parse().ok())
            .collect()
    }

    pub fn replay_header(&self) -> &str {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("x-ssegate-replay: "))
            .unwrap_or("")
    }
}

/// Reads an event stream for `secs` seconds (then drops the connection, as a client
/// that loses its network would).
pub fn sse(url: &str, headers: &[&str], secs: f64) -> Seen {
    sse_with(url, headers, &[], secs)
}

/// [`sse`] with more curl flags (`--http2-prior-knowledge`...).
pub fn sse_with(url: &str, headers: &[&str], flags: &[&str], secs: f64) -> Seen {
    let mut args: Vec<String> = vec![
        "-s".into(),
        "-i".into(),
        "-N".into(),
        "--max-time".into(),
        secs.to_string(),
    ];
    for h in headers {
        args.push("-H".into());
        args.push(h.to_string());
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    args.push(url.into());
    let out = Command::new("curl").args(&args).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Seen {
        head: head.to_ascii_lowercase(),
        events: parse_stream(body.as_bytes()).0,
    }
}

/// A real `redis-server` (Debian's) on a free loopback port in a temp dir, with no
/// persistence; stopped by PID when dropped.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub proc: Option<Proc>,
}

impl Redis {
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut r = Redis {
            port,
            dir,
            proc: None,
        };
        r.restart();
        r
    }

    /// A server that speaks TLS only (a certificate for 127.0.0.1 in `dir`, as
    /// `cert.pem`) and wants `password`.
    pub fn start_tls(password: &str) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = TestCert::for_names(dir.path(), "cert", &["localhost", "127.0.0.1"]);
        let port = free_port();
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--tls-cert-file")
            .arg(&cert.cert)
            .arg("--tls-key-file")
            .arg(&cert.key)
            .args(["--tls-auth-clients", "no", "--requirepass", password])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        wait_port(port, &mut child, "redis-server (TLS)");
        Redis {
            port,
            dir,
            proc: Some(Proc { child }),
        }
    }

    /// Starts the server (again, empty: as after a crash without persistence).
    pub fn restart(&mut self) {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (the README's test command installs it)");
        wait_port(self.port, &mut child, "redis-server");
        self.proc = Some(Proc { child });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.proc.as_ref().map_or(0, |p| p.child.id() as i32)
    }

    /// `kill -9`, as a crash.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Runs a command through `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Sends a signal by name to a PID.
pub fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Headless Chromium's `EventSource` on `page` (`tests/node/browser_es.mjs`), until the
/// page has `want` events or `timeout_ms` passes: the page's `window.stats`.
pub fn browser_stats(page: &str, want: usize, timeout_ms: u64) -> serde_json::Value {
    let out = Command::new("node")
        .arg(repo().join("tests/node/browser_es.mjs"))
        .args([page, &want.to_string(), &timeout_ms.to_string()])
        .output()
        .expect("run node");
    // Node's stderr too: without `tests/node/node_modules` (scripts/test installs them)
    // the script dies before printing, and stdout alone says nothing of why.
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "browser output ({e}): {}\nnode's stderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Reads one response with a `Content-Length` body from `r`: its head and body.
pub fn read_response<R: Read>(r: &mut BufReader<R>) -> (String, Vec<u8>) {
    let mut head = String::new();
    let mut len = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("head");
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length: ") {
            len = v.trim().parse().expect("length");
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    (head, body)
}

/// Whether the peer has closed `s` (a read sees EOF or a reset, not a timeout).
pub fn is_closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// An h2c (prior knowledge) connection to `port`, driven in the background.
pub async fn h2c_connect(port: u16) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// For a raw backend of a test's own: reads a request's head from `conn` (up to and
/// including its blank line); `None` if the connection ends first.
pub fn read_request_head(conn: &mut impl Read) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}
