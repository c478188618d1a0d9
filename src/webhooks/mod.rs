//! Webhooks: a job's `webhook_url` is told when the job ends. This module owns the two rules every
//! delivery follows: where it may go (no loopback/private/link-local target unless the operator
//! allows it, checked against every address the host resolves to) and how it is signed
//! (`X-ModelPress-Signature: t=<unix>, v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, with the
//! tenant's secret). The sender (`sender`) drives deliveries from the `webhook_deliveries` table.

pub mod sender;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SIGNATURE_HEADER: &str = "x-modelpress-signature";
/// Longest `webhook_url` accepted.
pub const MAX_URL_LEN: usize = 2048;

/// A webhook URL that passed the checks, with the addresses its host resolved to (the delivery
/// connects to one of these, so a DNS answer that changes after the check cannot redirect it).
#[derive(Debug, Clone)]
pub struct Target {
    pub url: url::Url,
    pub host: String,
    pub addrs: Vec<SocketAddr>,
}

/// Parses and resolves `raw`; refuses non-HTTP(S) schemes, credentials in the URL, hosts that do
/// not resolve, and (unless `allow_private`) any host with a non-public address among its answers.
pub async fn check_url(raw: &str, allow_private: bool) -> Result<Target, String> {
    if raw.len() > MAX_URL_LEN {
        return Err(format!("webhook_url is longer than {MAX_URL_LEN} characters"));
    }
    let url = url::Url::parse(raw).map_err(|e| format!("webhook_url is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("webhook_url must be http or https, not {:?}", url.scheme()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("webhook_url may not carry credentials".into());
    }
    let port = url.port_or_known_default().ok_or("webhook_url has no port")?;
    let (host, addrs) = match url.host() {
        None => return Err("webhook_url has no host".into()),
        Some(url::Host::Ipv4(ip)) => (ip.to_string(), vec![SocketAddr::new(ip.into(), port)]),
        Some(url::Host::Ipv6(ip)) => (ip.to_string(), vec![SocketAddr::new(ip.into(), port)]),
        Some(url::Host::Domain(name)) => {
            let lookup = tokio::net::lookup_host((name, port));
            let addrs: Vec<SocketAddr> = tokio::time::timeout(Duration::from_secs(5), lookup)
                .await
                .map_err(|_| format!("resolving {name} timed out"))?
                .map_err(|e| format!("{name} does not resolve: {e}"))?
                .collect();
            (name.to_string(), addrs)
        }
    };
    if addrs.is_empty() {
        return Err(format!("{host} does not resolve to any address"));
    }
    if !allow_private && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "webhook_url's host {host} resolves to {}, a loopback, private, link-local or otherwise \
             non-public address (webhooks.allow_private_targets is off)",
            bad.ip()
        ));
    }
    Ok(Target { url, host, addrs })
}

/// Whether `ip` is an ordinary globally routable address: not loopback, private, link-local,
/// CGNAT, multicast, documentation, benchmarking, reserved or unspecified, and not an IPv6 form
/// that embeds such an IPv4 address (mapped, compatible, NAT64, 6to4).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b)))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    if s[..6] == [0; 6] {
        // ::/96, IPv4-compatible (and :: and ::1 themselves).
        return !ip.is_unspecified() && !ip.is_loopback() && is_public_v4(embedded_v4(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded_v4(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return is_public_v4(embedded_v4(s[1], s[2]));
    }
    !(ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]))
}

/// The signature header's value for `body` sent at unix time `t`.
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t}, v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature header as a receiver should: the MAC in constant time, and the timestamp
/// within `tolerance_s` of `now` (so a captured request cannot be replayed later).
pub fn verify_signature(secret: &str, header: &str, body: &[u8], now: i64, tolerance_s: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > tolerance_s {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_recognized() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} should not be public");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} should be public");
        }
    }

    #[tokio::test]
    async fn urls_are_checked_before_any_address_is_trusted() {
        for bad in [
            "ftp://example.com/hook",
            "http://user:pw@8.8.8.8/hook",
            "not a url",
            "http://127.0.0.1:9/hook",
            "http://[::1]/hook",
            "http://localhost/hook",
            "http://169.254.169.254/latest/meta-data",
        ] {
            assert!(check_url(bad, false).await.is_err(), "{bad} should be refused");
        }
        assert!(check_url("http://127.0.0.1:9/hook", true).await.is_ok());
        assert!(check_url("https://8.8.8.8/hook", false).await.is_ok());
    }

    #[test]
    fn signatures_verify_only_for_the_same_secret_body_and_a_recent_time() {
        let header = signature("s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(header.starts_with("t=1700000000, v1="));
        assert!(verify_signature("s3cret", &header, b"{\"a\":1}", 1_700_000_010, 300));
        assert!(!verify_signature("other", &header, b"{\"a\":1}", 1_700_000_010, 300));
        assert!(!verify_signature("s3cret", &header, b"{\"a\":2}", 1_700_000_010, 300));
        assert!(!verify_signature("s3cret", &header, b"{\"a\":1}", 1_700_001_000, 300));
    }
}
