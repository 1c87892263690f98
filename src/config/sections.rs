//! The per-section checks the routes inherit from: `[sse]`, `[replay]`, `[limits]`,
//! each also allowed per route over the global one.

use std::time::Duration;

use super::check::Checker;
use super::file;
use super::*;
use crate::limit::{ClientIdentity, LimitSettings, Rate};

impl Checker<'_> {
    pub(super) fn replay(
        &mut self,
        own: Option<&file::Replay>,
        base: &str,
        parent: &ReplaySettings,
    ) -> ReplaySettings {
        let Some(own) = own else {
            return parent.clone();
        };
        if base != "replay" {
            for (name, v) in [
                ("total_max_bytes", &own.total_max_bytes),
                ("lag_blocks", &own.lag_blocks),
                ("max_hubs", &own.max_hubs),
                ("max_hubs_per_client", &own.max_hubs_per_client),
            ] {
                if let Some(v) = v {
                    self.span_error(
                        v,
                        &format!("{base}.{name}"),
                        "gateway-wide: set it in [replay]",
                    );
                }
            }
        }
        let mut r = parent.clone();
        if let Some(v) = own.enabled {
            r.enabled = v;
        }
        if let Some(v) = own.shared {
            r.shared = v;
        }
        if let Some(v) = &own.linger {
            r.linger = self.duration(v, &format!("{base}.linger"));
        }
        if let Some(v) = own.max_events {
            r.bounds.max_events = v;
        }
        if let Some(v) = own.max_bytes {
            r.bounds.max_bytes = v;
        }
        if let Some(v) = &own.max_age {
            r.bounds.max_age = self.duration(v, &format!("{base}.max_age"));
        }
        if let Some(v) = &own.identity_headers {
            r.identity_headers = v.iter().map(|h| h.to_ascii_lowercase()).collect();
        }
        if let Some(v) = &own.last_event_id_param {
            r.last_event_id_param = (!v.is_empty()).then(|| v.clone());
        }
        if let Some(v) = own.on_connect {
            r.on_connect = v;
        }
        if let Some(v) = own.miss_event {
            r.miss_event = v;
        }
        r
    }
    pub(super) fn refuse_mode(
        &mut self,
        v: &toml::Spanned<String>,
        key: &str,
    ) -> RefuseStreamsWith {
        match v.get_ref().as_str() {
            "event-stream" => RefuseStreamsWith::EventStream,
            "429" => RefuseStreamsWith::TooManyRequests,
            _ => {
                self.span_error(v, key, "must be \"event-stream\" or \"429\"");
                RefuseStreamsWith::EventStream
            }
        }
    }

    /// A rate from `rate` (per second, 0 = off) and `burst`, with defaults.
    pub(super) fn rate(
        &mut self,
        rate: Option<&toml::Spanned<f64>>,
        burst: Option<&toml::Spanned<u32>>,
        default: Option<Rate>,
        key: &str,
    ) -> Option<Rate> {
        let per_second = match rate {
            Some(r) if !r.get_ref().is_finite() || *r.get_ref() < 0.0 => {
                self.span_error(
                    r,
                    key,
                    "must be a number of requests per second, 0 to turn off",
                );
                return None;
            }
            Some(r) => *r.get_ref(),
            None => default?.per_second,
        };
        if per_second == 0.0 {
            return None;
        }
        let burst_key = key.replace("_rate", "_burst");
        let burst = match burst {
            Some(b) => match std::num::NonZeroU32::new(*b.get_ref()) {
                Some(n) => n,
                None => {
                    self.span_error(b, &burst_key, "must be at least 1");
                    return None;
                }
            },
            None => std::num::NonZeroU32::new(
                default
                    .map_or(per_second.ceil() as u32, |d| d.burst.get())
                    .max(1),
            )?,
        };
        Some(Rate { per_second, burst })
    }

    pub(super) fn limits(&mut self, raw: Option<&file::Limits>) -> Limits {
        let empty = file::Limits::default();
        let l = raw.unwrap_or(&empty);
        let d = Limits::default();
        let mut trusted_proxies = vec![];
        for (i, n) in l.trusted_proxies.iter().enumerate() {
            let text = n.get_ref();
            // A bare address means that one host.
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => self.span_error(
                    n,
                    &format!("limits.trusted_proxies[{i}]"),
                    "not an address or network such as \"10.0.0.0/8\"",
                ),
            }
        }
        let ipv6_prefix = match &l.ipv6_prefix {
            Some(p) if *p.get_ref() > 128 => {
                self.span_error(p, "limits.ipv6_prefix", "must be 0 to 128");
                d.identity.ipv6_prefix
            }
            Some(p) => *p.get_ref(),
            None => d.identity.ipv6_prefix,
        };
        let settings = LimitSettings {
            request_rate: self.rate(
                l.request_rate.as_ref(),
                l.request_burst.as_ref(),
                d.settings.request_rate,
                "limits.request_rate",
            ),
            stream_connect_rate: self.rate(
                l.stream_connect_rate.as_ref(),
                l.stream_connect_burst.as_ref(),
                d.settings.stream_connect_rate,
                "limits.stream_connect_rate",
            ),
            max_streams_per_client: l
                .max_streams_per_client
                .unwrap_or(d.settings.max_streams_per_client),
            max_streams: l.max_streams.unwrap_or(d.settings.max_streams),
            max_tracked_clients: match &l.max_tracked_clients {
                Some(v) if *v.get_ref() == 0 => {
                    self.span_error(v, "limits.max_tracked_clients", "must be at least 1");
                    1
                }
                Some(v) => *v.get_ref(),
                None => d.settings.max_tracked_clients,
            },
        };
        let refusal_retry = l.refusal_retry.as_ref().map_or(d.refusal_retry, |v| {
            self.duration(v, "limits.refusal_retry")
        });
        let retry_jitter = match &l.retry_jitter {
            Some(v) if !(0.0..=10.0).contains(v.get_ref()) => {
                self.span_error(v, "limits.retry_jitter", "must be between 0 and 10");
                d.retry_jitter
            }
            Some(v) => *v.get_ref(),
            None => d.retry_jitter,
        };
        let prune_interval = l.prune_interval.as_ref().map_or(d.prune_interval, |v| {
            self.duration(v, "limits.prune_interval")
        });
        Limits {
            identity: ClientIdentity {
                trusted_proxies,
                ipv6_prefix,
            },
            settings,
            refusal_retry,
            retry_jitter,
            prune_interval: prune_interval.max(Duration::from_millis(100)),
        }
    }

    /// Builds stream settings from `own` (a route's `[sse]` or the global one), falling
    /// back to `parent` for keys it leaves out.
    pub(super) fn sse(
        &mut self,
        own: Option<&file::Sse>,
        base: &str,
        parent: Option<&SseSettings>,
    ) -> SseSettings {
        let defaults = SseSettings::default();
        let parent = parent.unwrap_or(&defaults);
        let Some(own) = own else {
            return parent.clone();
        };
        let heartbeat_interval = match &own.heartbeat_interval {
            Some(v) => {
                let d = self.duration(v, &format!("{base}.heartbeat_interval"));
                if d < Duration::from_millis(10) {
                    self.span_error(
                        v,
                        &format!("{base}.heartbeat_interval"),
                        "must be at least 10ms",
                    );
                }
                d
            }
            None => parent.heartbeat_interval,
        };
        let heartbeat_comment = match &own.heartbeat_comment {
            Some(v) => {
                if v.get_ref().contains(['\r', '\n']) {
                    self.span_error(v, &format!("{base}.heartbeat_comment"), "must be one line");
                }
                v.get_ref().clone()
            }
            None => parent.heartbeat_comment.clone(),
        };
        let shutdown_retry = match &own.shutdown_retry {
            Some(v) => self.duration(v, &format!("{base}.shutdown_retry")),
            None => parent.shutdown_retry,
        };
        let max_event_bytes = match &own.max_event_bytes {
            Some(v) if *v.get_ref() < 64 => {
                self.span_error(v, &format!("{base}.max_event_bytes"), "must be at least 64");
                parent.max_event_bytes
            }
            Some(v) => *v.get_ref(),
            None => parent.max_event_bytes,
        };
        let retry = match &own.retry {
            Some(v) => Some(self.duration(v, &format!("{base}.retry"))),
            None => parent.retry,
        };
        let write_timeout = match &own.write_timeout {
            Some(v) => self.duration(v, &format!("{base}.write_timeout")),
            None => parent.write_timeout,
        };
        SseSettings {
            heartbeat_interval,
            heartbeat_comment,
            shutdown_retry,
            max_event_bytes,
            retry,
            write_timeout,
        }
    }
}
