//! The command line: `-t` config checks with located errors, `--version`, `--help`.

mod common;

use std::process::Command;

use common::*;

fn check(toml: &str) -> (i32, String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, toml).expect("write");
    let out = Command::new(bin())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text, path, dir)
}

const GOOD: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

[[upstreams]]
name = "php"
servers = ["127.0.0.1:8081"]

[[routes]]
upstream = "php"
"#;

#[test]
fn valid_config_passes() {
    let (code, text, _, _d) = check(GOOD);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is valid"), "{text}");
}

#[test]
fn shipped_configs_are_valid() {
    for name in ["conf/ssegate.toml", "conf/demo.toml"] {
        let out = Command::new(bin())
            .arg("-t")
            .arg("-c")
            .arg(repo().join(name))
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn malformed_toml_names_file_and_line() {
    let (code, text, path, _d) = check("[[listeners]]\naddress = \"127.0.0.1:8080\n");
    assert_eq!(code, 1);
    assert!(text.contains(&format!("{}:2:", path.display())), "{text}");
}

#[test]
fn durations_past_a_year_are_refused_not_overflowed() {
    for key in [
        "[sse]\nheartbeat_interval",
        "[replay]\nlinger",
        "[server]\ngrace_period",
    ] {
        let (code, text, path, _d) = check(&format!("{GOOD}\n{key} = \"500000000years\"\n"));
        assert_eq!(code, 1, "{key}: {text}");
        assert!(text.contains(&format!("{}:13:", path.display())), "{text}");
        assert!(text.contains("longer than a year"), "{text}");
    }
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let (code, text, path, _d) = check(&format!("{GOOD}\n[sse]\nheartbeat_intervall = \"5s\"\n"));
    assert_eq!(code, 1);
    assert!(text.contains(&format!("{}:13:1", path.display())), "{text}");
    assert!(text.contains("heartbeat_intervall"), "{text}");
}

#[test]
fn missing_cert_file_is_named() {
    let (code, text, path, _d) = check(&format!(
        "{GOOD}\n[[listeners]]\naddress = \"127.0.0.1:8443\"\ntls = {{ cert = \"missing.pem\", key = \"missing.key\" }}\n"
    ));
    assert_eq!(code, 1);
    assert!(text.contains(&format!("{}:14:", path.display())), "{text}");
    assert!(text.contains("listeners[1].tls.cert"), "{text}");
    assert!(text.contains("missing.pem"), "{text}");
}

#[test]
fn mismatched_key_is_an_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let a = TestCert::generate(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    let b = TestCert::generate(&other);
    let (code, text, _, _d) = check(&format!(
        "{GOOD}\n[[listeners]]\naddress = \"127.0.0.1:8443\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        a.cert.display(),
        b.key.display()
    ));
    assert_eq!(code, 1);
    assert!(text.contains("listeners[1].tls.key"), "{text}");
}

#[test]
fn bad_address_and_every_other_error_reported_together() {
    let (code, text, path, _d) = check(
        r#"
[[listeners]]
address = "localhost:http"

[[upstreams]]
name = "php"
servers = ["127.0.0.1:8081"]

[[routes]]
upstream = "nope"
path_prefix = "api"
"#,
    );
    assert_eq!(code, 1);
    let p = path.display();
    assert!(
        text.contains(&format!("{p}:3:11: listeners[0].address")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{p}:10:12: routes[0].upstream")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{p}:11:15: routes[0].path_prefix")),
        "{text}"
    );
}

#[test]
fn version_and_help() {
    let out = Command::new(bin()).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(bin()).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in ["--conf", "--test", "--upgrade", "--version"] {
        assert!(help.contains(flag), "{help}");
    }
}

#[test]
fn production_example_is_valid_with_its_certificates_in_place() {
    let dir = tempfile::tempdir().expect("tmp");
    let cert = TestCert::generate(dir.path());
    let conf =
        std::fs::read_to_string(repo().join("conf/production.toml")).expect("production.toml");
    let conf = conf
        .replace(
            "/etc/ssegate/tls/fullchain.pem",
            &cert.cert.display().to_string(),
        )
        .replace(
            "/etc/ssegate/tls/privkey.pem",
            &cert.key.display().to_string(),
        );
    let (code, text, _, _d) = check(&conf);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn devices_are_refused_as_config_or_certificate_files() {
    let out = Command::new(bin())
        .args(["-t", "-c", "/dev/zero"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a regular file"));
    // A certificate or key that is a device, or larger than any PEM chain: refused
    // with the key named, before anything is read into memory.
    let dir = tempfile::tempdir().expect("tmp");
    let cert = TestCert::generate(dir.path());
    let huge = dir.path().join("huge.pem");
    let mut big = std::fs::read(&cert.cert).expect("cert");
    big.resize(2 * 1024 * 1024, b'\n');
    std::fs::write(&huge, big).expect("write");
    let cert_path = cert.cert.display().to_string();
    let key_path = cert.key.display().to_string();
    let huge_path = huge.display().to_string();
    for (c, k, key, why) in [
        (
            "/dev/zero",
            key_path.as_str(),
            "listeners[0].tls.cert",
            "not a regular file",
        ),
        (
            cert_path.as_str(),
            "/dev/zero",
            "listeners[0].tls.key",
            "not a regular file",
        ),
        (
            huge_path.as_str(),
            key_path.as_str(),
            "listeners[0].tls.cert",
            "larger than 1048576 bytes",
        ),
    ] {
        let toml = GOOD.replace(
            "address = \"127.0.0.1:8080\"",
            &format!("address = \"127.0.0.1:8443\"\ntls = {{ cert = \"{c}\", key = \"{k}\" }}"),
        );
        let (code, text, _, _d) = check(&toml);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains(key) && text.contains(why), "{key}: {text}");
    }
}

/// pingora's upgrade socket and the streams' handover socket beside it are only ever
/// put where no other local user can create files: a directory anyone may write (like
/// `/tmp`) is refused at start, before a socket exists that could be stood in for.
#[test]
fn an_upgrade_socket_in_a_directory_others_can_write_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let open = dir.path().join("shared");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let port = free_port();
    let toml = GOOD.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    let conf = dir.path().join("gw.toml");
    let sock = open.join("upgrade.sock");
    std::fs::write(
        &conf,
        format!("[server]\nupgrade_sock = \"{}\"\n{toml}", sock.display()),
    )
    .expect("write");
    let mut child = Command::new(bin())
        .arg("-c")
        .arg(&conf)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(err.contains("server.upgrade_sock"), "{err}");
    assert!(err.contains("writable by other users"), "{err}");
    assert!(!sock.exists());
}
