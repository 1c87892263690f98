//! `[cluster]`: checked into [`Cluster`]. Secrets may come from the file, an environment
//! variable or a file of their own; none is ever echoed in an error.

use super::check::Checker;
use super::{file, Cluster};

/// Shortest key secret: an HMAC key is only as good as its secret.
const MIN_SECRET_BYTES: usize = 16;

/// The URL with any password replaced by `***`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl Checker<'_> {
    /// `[cluster]`; `None` when it has errors (they are collected).
    pub(super) fn cluster(&mut self, raw: &file::Cluster) -> Option<Cluster> {
        let before = self.errors.len();
        let url = raw.redis.get_ref().trim().to_owned();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            self.span_error(
                &raw.redis,
                "cluster.redis",
                "must be a redis:// or rediss:// URL",
            );
        } else if let Err(e) = redis::Client::open(url.as_str()) {
            // The crate's message never contains the password.
            self.span_error(
                &raw.redis,
                "cluster.redis",
                &format!("not a Redis URL: {e}"),
            );
        }
        let password = self.secret(
            None,
            raw.password_env.as_ref(),
            raw.password_file.as_ref(),
            "cluster.password",
        );
        let key_secret = self.key_secret(raw);
        let node_id = match &raw.node_id {
            Some(v) if v.get_ref().is_empty() || v.get_ref().contains(char::is_whitespace) => {
                self.span_error(v, "cluster.node_id", "must be a non-empty word");
                String::new()
            }
            Some(v) => v.get_ref().clone(),
            None => default_node_id(),
        };
        let (lease, timeout) = self.timing(raw);
        let prefix = match &raw.prefix {
            Some(v) if v.get_ref().is_empty() || v.get_ref().contains(['{', '}', ' ']) => {
                self.span_error(
                    v,
                    "cluster.prefix",
                    "must be a non-empty name without braces",
                );
                String::new()
            }
            Some(v) => v.get_ref().clone(),
            None => Cluster::PREFIX.to_owned(),
        };
        (self.errors.len() == before).then_some(Cluster {
            redis: url,
            password,
            node_id,
            key_secret,
            lease,
            timeout,
            prefix,
        })
    }

    /// `key_secret` (inline, `_env` or `_file`): required, at least 16 bytes.
    fn key_secret(&mut self, raw: &file::Cluster) -> Vec<u8> {
        let key_secret = self.secret(
            raw.key_secret.as_ref(),
            raw.key_secret_env.as_ref(),
            raw.key_secret_file.as_ref(),
            "cluster.key_secret",
        );
        match key_secret {
            Some(s) if s.len() >= MIN_SECRET_BYTES => s.into_bytes(),
            Some(_) => {
                let span = raw
                    .key_secret
                    .as_ref()
                    .or(raw.key_secret_env.as_ref())
                    .or(raw.key_secret_file.as_ref())
                    .map(|v| v.span());
                self.error(
                    span,
                    "cluster.key_secret",
                    &format!("must be at least {MIN_SECRET_BYTES} bytes"),
                );
                vec![]
            }
            // Given but unreadable: that error is reported already.
            None if raw.key_secret_env.is_some() || raw.key_secret_file.is_some() => vec![],
            None => {
                self.span_error(
                    &raw.redis,
                    "cluster.key_secret",
                    "required (or key_secret_env / key_secret_file): the same secret on \
                     every node names the streams in Redis",
                );
                vec![]
            }
        }
    }

    /// `lease` and `timeout`: a call must fit in a third of a lease (renewals happen
    /// every third).
    fn timing(&mut self, raw: &file::Cluster) -> (std::time::Duration, std::time::Duration) {
        let lease = raw
            .lease
            .as_ref()
            .map_or(Cluster::LEASE, |v| self.duration(v, "cluster.lease"));
        let timeout = raw
            .timeout
            .as_ref()
            .map_or(Cluster::TIMEOUT, |v| self.duration(v, "cluster.timeout"));
        if lease < std::time::Duration::from_secs(1) {
            if let Some(v) = &raw.lease {
                self.span_error(v, "cluster.lease", "must be at least 1s");
            }
        }
        if timeout.is_zero() || timeout * 3 > lease {
            let v = raw.timeout.as_ref().unwrap_or(&raw.redis);
            self.span_error(
                v,
                "cluster.timeout",
                "must be more than 0s and at most a third of cluster.lease",
            );
        }
        (lease, timeout)
    }

    /// A secret given inline, by environment variable, or by file (one of them).
    fn secret(
        &mut self,
        inline: Option<&toml::Spanned<String>>,
        env: Option<&toml::Spanned<String>>,
        path: Option<&toml::Spanned<String>>,
        key: &str,
    ) -> Option<String> {
        let given = [inline, env, path].iter().filter(|v| v.is_some()).count();
        if given > 1 {
            let v = inline.or(env).or(path)?;
            self.span_error(v, key, "give it one way only (inline, _env or _file)");
            return None;
        }
        if let Some(v) = inline {
            return Some(v.get_ref().clone());
        }
        if let Some(v) = env {
            return match std::env::var(v.get_ref()) {
                Ok(s) if !s.is_empty() => Some(s),
                _ => {
                    let msg = format!("environment variable {} is not set", v.get_ref());
                    self.span_error(v, &format!("{key}_env"), &msg);
                    None
                }
            };
        }
        let v = path?;
        match std::fs::read_to_string(self.relative(v.get_ref())) {
            Ok(s) => Some(s.trim_end_matches(['\r', '\n']).to_owned()),
            Err(e) => {
                self.span_error(v, &format!("{key}_file"), &format!("cannot read: {e}"));
                None
            }
        }
    }
}

/// Host name + process id: unique per running node without configuration.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let host = if host.is_empty() { "node".into() } else { host };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn load(cluster: &str) -> Result<Config, String> {
        let text = format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n[[upstreams]]\nname = \"php\"\n\
             servers = [\"127.0.0.1:1\"]\n[[routes]]\nupstream = \"php\"\n[cluster]\n{cluster}"
        );
        Config::from_str(&text, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_cluster_section_is_checked_with_places_and_no_secret_in_messages() {
        let ok = load("redis = \"redis://127.0.0.1:6379/0\"\nkey_secret = \"0123456789abcdef\"\n")
            .unwrap();
        let c = ok.cluster.unwrap();
        assert_eq!((c.lease, c.timeout), (Cluster::LEASE, Cluster::TIMEOUT));
        assert!(c.node_id.ends_with(&std::process::id().to_string()));
        let e = load("redis = \"http://x\"\nkey_secret = \"short\"\n").unwrap_err();
        assert!(
            e.contains("t.toml:9:9: cluster.redis: must be a redis://"),
            "{e}"
        );
        assert!(
            e.contains("cluster.key_secret: must be at least 16 bytes"),
            "{e}"
        );
        assert!(!e.contains("short"), "{e}");
        let e = load("redis = \"redis://h\"\n").unwrap_err();
        assert!(e.contains("cluster.key_secret: required"), "{e}");
        let e = load(
            "redis = \"redis://h\"\nkey_secret_env = \"SSEGATE_TEST_UNSET_VAR\"\ntimeout = \"5s\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("cluster.key_secret_env: environment variable"),
            "{e}"
        );
        assert!(e.contains("cluster.timeout: must be"), "{e}");
        let dbg = format!(
            "{:?}",
            load("redis = \"redis://u:hunter2@h:1/\"\nkey_secret = \"0123456789abcdefXYZ\"\n")
                .unwrap()
                .cluster
                .unwrap()
        );
        assert!(!dbg.contains("hunter2") && !dbg.contains("XYZ"), "{dbg}");
        assert!(dbg.contains("redis://u:***@h:1/"), "{dbg}");
    }
}
