//! The docker-compose demo, checked without a Docker engine (none runs on our machines):
//! the compose file's structure and paths, the Dockerfile's stages and hygiene, and the
//! gateway config the container runs (with a generated certificate, and the compose
//! service name replaced by a local address). The same services run natively in the
//! other tests: Apache + mod_php from Debian serving the same scripts.

mod common;

use std::process::Command;

use common::*;

fn compose() -> serde_yaml::Value {
    let text =
        std::fs::read_to_string(repo().join("docker-compose.yml")).expect("docker-compose.yml");
    serde_yaml::from_str(&text).expect("docker-compose.yml is valid YAML")
}

#[test]
fn compose_file_is_complete_and_its_paths_exist() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    for name in ["backend", "dev-cert", "gateway"] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    assert!(c["services"]["backend"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("php:") && i.ends_with("-apache")));
    let gw = &c["services"]["gateway"];
    assert_eq!(gw["build"]["context"].as_str(), Some("."));
    let dockerfile = gw["build"]["dockerfile"].as_str().expect("dockerfile");
    assert!(repo().join(dockerfile).exists(), "{dockerfile} missing");
    assert_eq!(
        gw["depends_on"]["dev-cert"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    let ports: Vec<&str> = gw["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert_eq!(ports, ["8080:8080", "8443:8443", "127.0.0.1:9901:9901"]);
    // Every bind mount's host side exists; named volumes are declared.
    for (name, svc) in services {
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let v = v.as_str().expect("short volume syntax");
            let host = v.split(':').next().unwrap_or("");
            if host.starts_with("./") {
                assert!(
                    repo().join(host).exists(),
                    "{name:?}: {host} does not exist"
                );
            } else {
                assert!(
                    c["volumes"]
                        .as_mapping()
                        .is_some_and(|m| m.contains_key(host)),
                    "{name:?}: volume {host} undeclared"
                );
            }
        }
    }
    let cmd: Vec<&str> = gw["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(cmd, ["-c", "/etc/ssegate/docker.toml"]);
    assert!(repo().join("conf/docker.toml").exists());
}

#[test]
fn dockerfile_is_multi_stage_small_and_non_root() {
    let d = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains(" AS build"));
    assert!(
        froms[1].contains("-slim"),
        "runtime image should be slim: {}",
        froms[1]
    );
    // What the build copies exists.
    for l in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "COPY source {src} missing");
        }
    }
    // Every patched crate Cargo.toml builds from a path (vendor/) is copied too, or the
    // image's `cargo build --locked` fails.
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("Cargo.toml is TOML");
    let patched = manifest
        .get("patch")
        .and_then(|p| p.get("crates-io"))
        .and_then(|p| p.as_table())
        .cloned()
        .unwrap_or_default();
    let copied: Vec<&str> = d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[1..parts.len() - 1].to_vec()
        })
        .collect();
    for (name, spec) in &patched {
        let path = spec.get("path").and_then(|p| p.as_str()).expect("a path");
        assert!(
            copied
                .iter()
                .any(|c| std::path::Path::new(path).starts_with(c)),
            "the Dockerfile does not copy {path} (patched {name})"
        );
    }
    // Hygiene a linter would ask for.
    for l in d.lines().filter(|l| l.contains("apt-get install")) {
        assert!(
            l.contains("--no-install-recommends") && l.contains("-y"),
            "{l}"
        );
    }
    assert!(d.contains("rm -rf /var/lib/apt/lists/*"));
    assert!(d
        .lines()
        .any(|l| l.starts_with("USER ") && !l.contains("root")));
    assert!(d.contains("--locked"));
    assert!(d.contains("EXPOSE 8080 8443 9901"));
}

#[test]
fn container_config_is_valid() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("certs")).expect("mkdir");
    let cert = TestCert::generate(&dir.path().join("certs"));
    std::fs::rename(&cert.cert, dir.path().join("certs/dev-cert.pem")).expect("mv");
    std::fs::rename(&cert.key, dir.path().join("certs/dev-key.pem")).expect("mv");
    let conf = std::fs::read_to_string(repo().join("conf/docker.toml")).expect("docker.toml");
    assert!(conf.contains("\"backend:80\""));
    // `backend` resolves only inside compose's network.
    let path = dir.path().join("docker.toml");
    std::fs::write(&path, conf.replace("\"backend:80\"", "\"127.0.0.1:80\"")).expect("write");
    let out = Command::new(bin())
        .arg("-t")
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `docker compose --profile cluster up`: Redis, two gateway nodes on the cluster config,
/// HAProxy balancing across them; none of it starts without the profile.
#[test]
fn cluster_profile_runs_two_nodes_on_redis_behind_haproxy() {
    let c = compose();
    let s = &c["services"];
    let profile = |name: &str| {
        s[name]["profiles"]
            .as_sequence()
            .is_some_and(|p| p.iter().any(|v| v.as_str() == Some("cluster")))
    };
    for name in ["redis", "node-a", "node-b", "balancer"] {
        assert!(profile(name), "{name} is not in the cluster profile");
    }
    for name in ["backend", "dev-cert", "gateway"] {
        assert!(!profile(name), "{name} must run without a profile");
    }
    assert!(s["redis"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("redis:")));
    assert!(s["balancer"]["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("haproxy:")));
    for node in ["node-a", "node-b"] {
        let cmd: Vec<&str> = s[node]["command"]
            .as_sequence()
            .expect("command")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(cmd, ["-c", "/etc/ssegate/cluster.toml"], "{node}");
        assert!(s[node]["environment"]["SSEGATE_CLUSTER_KEY"]
            .as_str()
            .is_some());
    }
    let haproxy =
        std::fs::read_to_string(repo().join("conf/haproxy-cluster.cfg")).expect("haproxy cfg");
    for server in ["node-a:8080", "node-b:8080"] {
        assert!(
            haproxy.contains(server),
            "HAProxy does not balance to {server}"
        );
    }
    assert!(
        haproxy.contains("timeout tunnel"),
        "streams need a long tunnel timeout"
    );
    if let Ok(out) = Command::new("haproxy")
        .args(["-c", "-f"])
        .arg(repo().join("conf/haproxy-cluster.cfg"))
        .output()
    {
        assert!(
            out.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The node config passes `-t` (compose's names replaced by local addresses).
    let dir = tempfile::tempdir().expect("tmp");
    let conf = std::fs::read_to_string(repo().join("conf/cluster.toml")).expect("cluster.toml");
    assert!(conf.contains("\"backend:80\"") && conf.contains("redis://redis:6379/0"));
    let path = dir.path().join("cluster.toml");
    let local = conf.replace("\"backend:80\"", "\"127.0.0.1:80\"").replace(
        "/tmp/ssegate/upgrade.sock",
        &dir.path().join("up/u.sock").display().to_string(),
    );
    std::fs::write(&path, local).expect("write");
    let out = Command::new(bin())
        .args(["-t", "-c"])
        .arg(&path)
        .env("SSEGATE_CLUSTER_KEY", "a secret of enough bytes")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn yaml(path: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid YAML: {e}"))
}

/// The `ssegate_…` names in a PromQL expression, and the labels of its `by (…)`.
fn names_and_labels(expr: &str) -> (Vec<String>, Vec<String>) {
    let mut names = vec![];
    let mut rest = expr;
    while let Some(i) = rest.find("ssegate_") {
        let n: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + n.len()..];
        names.push(n);
    }
    let labels = expr
        .split("by (")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .flat_map(|s| s.split(',').map(|l| l.trim().to_owned()))
        .collect();
    (names, labels)
}

/// `docker compose --profile observability`: Prometheus scrapes the gateway's admin
/// port, Grafana is provisioned with that Prometheus and the dashboard, and every series
/// the dashboard queries (with every label it groups by) is one a real gateway exports.
#[test]
fn observability_profile_dashboard_queries_only_exported_series() {
    let c = compose();
    for (name, image) in [
        ("prometheus", "prom/prometheus:"),
        ("grafana", "grafana/grafana:"),
    ] {
        let svc = &c["services"][name];
        assert_eq!(svc["profiles"][0].as_str(), Some("observability"), "{name}");
        assert!(
            svc["image"].as_str().is_some_and(|i| i.starts_with(image)),
            "{name}"
        );
    }
    let mounts: Vec<&str> = c["services"]["grafana"]["volumes"]
        .as_sequence()
        .expect("grafana volumes")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(mounts.contains(&"./conf/grafana/provisioning:/etc/grafana/provisioning:ro"));
    let dash_mount = mounts
        .iter()
        .find(|m| m.starts_with("./conf/grafana/ssegate.json:"))
        .expect("the dashboard is mounted");
    // Prometheus scrapes the port the container config serves its admin on.
    let prom = yaml("conf/prometheus.yml");
    let targets: Vec<&str> = prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|j| {
            j["static_configs"][0]["targets"]
                .as_sequence()
                .into_iter()
                .flatten()
        })
        .filter_map(|t| t.as_str())
        .collect();
    assert!(targets.contains(&"gateway:9901"), "{targets:?}");
    let docker_toml = std::fs::read_to_string(repo().join("conf/docker.toml")).expect("toml");
    assert!(docker_toml.contains("admin_address = \"0.0.0.0:9901\""));
    // Grafana: the data source the panels name, and a provider for the mounted file.
    let ds = yaml("conf/grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["uid"].as_str(), Some("prometheus"));
    assert_eq!(
        ds["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
    let provider = yaml("conf/grafana/provisioning/dashboards/ssegate.yml");
    let dir = provider["providers"][0]["options"]["path"]
        .as_str()
        .expect("path");
    assert!(
        dash_mount.contains(&format!(":{dir}/ssegate.json")),
        "{dash_mount} vs {dir}"
    );

    // What a real gateway exports: TLS, admin and a cluster on a real Redis, after one
    // stream over TLS (label sets appear once used or known from the config).
    let redis = Redis::start();
    let php = Php::start();
    let gw = GatewayOptions::to(&php)
        .tls()
        .admin()
        .extra(&format!(
            "[cluster]\nredis = \"{}\"\nkey_secret = \"a test secret of enough bytes\"\n",
            redis.url()
        ))
        .start();
    let ca = gw.cert.as_ref().expect("cert").cert.display().to_string();
    let (ok, _) = curl(&["--cacert", &ca, "-N", &gw.tls_url("/legacy.php?n=2")]);
    assert!(ok.success());
    let admin = gw.admin_port.expect("admin");
    assert!(wait_for(
        || admin_metric(admin, "ssegate_requests_total") >= 1.0
    ));
    let (_, text) = curl(&[&format!("http://127.0.0.1:{admin}/metrics")]);
    let text = String::from_utf8_lossy(&text);

    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("conf/grafana/ssegate.json")).expect("dashboard"),
    )
    .expect("the dashboard is valid JSON");
    assert_eq!(dash["uid"], "ssegate");
    let mut queried = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], "prometheus", "{t}");
            let expr = t["expr"].as_str().expect("expr");
            let (names, labels) = names_and_labels(expr);
            assert!(!names.is_empty(), "a query of no ssegate series: {expr}");
            for n in &names {
                queried.insert(n.clone());
                assert!(
                    text.contains(&format!("# TYPE {n} ")),
                    "{n} is not exported ({expr})"
                );
                for l in &labels {
                    let labelled = text.lines().any(|s| {
                        s.starts_with(&format!("{n}{{")) && s.contains(&format!("{l}=\""))
                    });
                    assert!(labelled, "{n} has no label {l} ({expr})");
                }
            }
        }
    }
    // The panels the dashboard promises.
    for n in [
        "ssegate_streams_open",
        "ssegate_events_total",
        "ssegate_heartbeats_total",
        "ssegate_refusals_total",
        "ssegate_replay_hits_total",
        "ssegate_hubs_lingering",
        "ssegate_upstream_errors_total",
        "ssegate_tls_handshakes_total",
        "ssegate_config_reloads_total",
        "ssegate_cluster_redis_up",
    ] {
        assert!(queried.contains(n), "no panel shows {n}");
    }
}
