//! DNS faults in user space: the mode, the name patterns users give (`--domain`), their wire
//! form and the keys the datapath looks them up by, and a reference of the datapath's query
//! matcher (for tests that hold the eBPF program to it, and for fuzzing).
use crate::{InvalidInput, invalid};
use chaos_abi::{DNS_EXACT, DNS_NAME_MAX, DNS_WILDCARD, DnsKey, FNV_OFFSET, dns_hash_step};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What a matching query gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DnsMode {
    /// Dropped silently: the client retries and times out.
    Timeout,
    Nxdomain,
    Servfail,
    Refused,
}

impl DnsMode {
    /// The RCODE of the answer, or 0 for dropping.
    pub fn rcode(self) -> u32 {
        match self {
            DnsMode::Timeout => 0,
            DnsMode::Servfail => 2,
            DnsMode::Nxdomain => 3,
            DnsMode::Refused => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DnsMode::Timeout => "timeout",
            DnsMode::Nxdomain => "nxdomain",
            DnsMode::Servfail => "servfail",
            DnsMode::Refused => "refused",
        }
    }
}

impl FromStr for DnsMode {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "timeout" => Ok(DnsMode::Timeout),
            "nxdomain" => Ok(DnsMode::Nxdomain),
            "servfail" => Ok(DnsMode::Servfail),
            "refused" => Ok(DnsMode::Refused),
            _ => Err(invalid(
                "--mode",
                format!("`{s}` must be timeout, nxdomain, servfail or refused"),
            )),
        }
    }
}

/// `example.com` (that name exactly) or `*.example.com` (every name below it, not the name
/// itself). Case-insensitive; stored lowercase without the trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPattern {
    pub name: String,
    pub wildcard: bool,
}

impl FromStr for DomainPattern {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        let bad = |rule: String| invalid("--domain", format!("`{s}` {rule}"));
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        if name.is_empty() {
            return Err(bad("needs a name (for every name, give no --domain)".into()));
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("has an empty label or one longer than 63 bytes".into()));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(
                    "may hold letters, digits, '-' and '_' only, with '*.' only in front".into(),
                ));
            }
        }
        let pattern = DomainPattern { name, wildcard };
        // A wildcard needs room for at least one more label (two bytes) in front.
        let room = if wildcard { 2 } else { 0 };
        if pattern.wire().len() + room > DNS_NAME_MAX - 1 {
            return Err(bad("is longer than a DNS name can be (255 bytes)".into()));
        }
        Ok(pattern)
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

impl DomainPattern {
    /// The name in wire form: length-prefixed labels and the root's zero byte.
    pub fn wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.name.len() + 2);
        for label in self.name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// The key the datapath looks this pattern up by.
    pub fn key(&self) -> DnsKey {
        let wire = self.wire();
        DnsKey {
            hash: suffix_hash(&wire),
            len: wire.len() as u32,
            kind: if self.wildcard {
                DNS_WILDCARD
            } else {
                DNS_EXACT
            },
        }
    }
}

/// The datapath's hash of a wire-form suffix (see `chaos_abi::dns_hash_step`).
pub fn suffix_hash(wire: &[u8]) -> u64 {
    wire.iter()
        .rev()
        .fold(FNV_OFFSET, |h, b| dns_hash_step(h, *b))
}

/// What the datapath does with a UDP DNS payload: the reference the eBPF matcher is tested
/// against. `None`: not a well-formed standard query (passed untouched); `Some(matched)`.
pub fn query_matches(payload: &[u8], patterns: &[DomainPattern]) -> Option<bool> {
    let hdr = payload.get(..12)?;
    let flags = u16::from_be_bytes([hdr[2], hdr[3]]);
    let count = |i: usize| u16::from_be_bytes([hdr[i], hdr[i + 1]]);
    if flags & 0xF800 != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 {
        return None;
    }
    let rest = &payload[12..];
    if rest.len() < 5 {
        return None;
    }
    let window = &rest[..rest.len().min(DNS_NAME_MAX)];
    let mut end = 0usize;
    loop {
        let len = *window.get(end)? as usize;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        end += len + 1;
        if end >= window.len() {
            return None;
        }
    }
    let qlen = end + 1;
    if qlen + 4 > rest.len() {
        return None;
    }
    if patterns.is_empty() {
        return Some(true);
    }
    let name = &window[..qlen];
    let keys: Vec<DnsKey> = patterns.iter().map(DomainPattern::key).collect();
    let mut start = 0;
    loop {
        let key = DnsKey {
            hash: suffix_hash(&name[start..]),
            len: (qlen - start) as u32,
            kind: if start == 0 { DNS_EXACT } else { DNS_WILDCARD },
        };
        if keys.contains(&key) {
            return Some(true);
        }
        let len = name[start] as usize;
        if len == 0 {
            return Some(false);
        }
        start += len + 1;
        if start >= qlen {
            return Some(false);
        }
    }
}

/// The properties the fuzz target (`fuzz/fuzz_targets/dns_query.rs`) checks on any input,
/// here so the unit tests run them too: neither parser panics; a query the matcher accepts
/// carries a question that ends inside the packet; a pattern that parses prints back to
/// itself and fits a DNS name.
pub fn check_parsers(data: &[u8]) {
    let patterns: Vec<DomainPattern> = ["api.example.com", "*.blocked.test"]
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Some(matched) = query_matches(data, &patterns) {
        assert!(data.len() > 12 + 4, "accepted a query without a question");
        if matched {
            assert_eq!(query_matches(data, &[]), Some(true));
        }
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(p) = text.parse::<DomainPattern>()
    {
        assert!(p.wire().len() < DNS_NAME_MAX);
        assert_eq!(p.to_string().parse::<DomainPattern>().ok(), Some(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        p
    }

    fn pats(p: &[&str]) -> Vec<DomainPattern> {
        p.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The fuzz target's checks over mutations of real queries and patterns (deterministic; the
    /// cargo-fuzz target explores further).
    #[test]
    fn parsers_hold_their_properties_on_mutated_input() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let seeds: Vec<Vec<u8>> = vec![
            query("api.example.com"),
            query("www.blocked.test"),
            query("a.b.c"),
            b"*.blocked.test".to_vec(),
            b"api.example.com.".to_vec(),
        ];
        for i in 0..200_000 {
            let mut d = seeds[i % seeds.len()].clone();
            for _ in 0..(next() % 4) {
                let r = next() as usize;
                match r % 3 {
                    0 if !d.is_empty() => {
                        let at = r / 3 % d.len();
                        d[at] ^= 1 << (r / 7 % 8);
                    }
                    1 => d.truncate(r / 3 % (d.len() + 1)),
                    _ => d.insert(r / 3 % (d.len() + 1), (r >> 8) as u8),
                }
            }
            check_parsers(&d);
        }
    }

    #[test]
    fn patterns_parse_and_refuse() {
        let p: DomainPattern = "*.Example.COM.".parse().unwrap();
        assert_eq!((p.name.as_str(), p.wildcard), ("example.com", true));
        assert_eq!(p.to_string(), "*.example.com");
        assert_eq!(p.wire(), b"\x07example\x03com\x00");
        for bad in [
            "",
            "*.",
            "a..b",
            "ex ample.com",
            "*.*.x",
            "a*.com",
            &"a".repeat(64),
        ] {
            let e = bad.parse::<DomainPattern>().unwrap_err();
            assert_eq!(e.field, "--domain", "{bad}");
        }
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(long.parse::<DomainPattern>().is_err(), "260 bytes");
    }

    #[test]
    fn matching_exact_wildcard_and_case() {
        let p = pats(&["api.example.com", "*.blocked.test"]);
        assert_eq!(query_matches(&query("api.example.com"), &p), Some(true));
        assert_eq!(query_matches(&query("API.Example.Com"), &p), Some(true));
        assert_eq!(
            query_matches(&query("www.api.example.com"), &p),
            Some(false)
        );
        assert_eq!(query_matches(&query("example.com"), &p), Some(false));
        assert_eq!(query_matches(&query("a.blocked.test"), &p), Some(true));
        assert_eq!(query_matches(&query("x.y.blocked.test"), &p), Some(true));
        assert_eq!(
            query_matches(&query("blocked.test"), &p),
            Some(false),
            "apex"
        );
        assert_eq!(query_matches(&query("notblocked.test"), &p), Some(false));
        assert_eq!(query_matches(&query("anything"), &[]), Some(true));
    }

    #[test]
    fn malformed_queries_are_not_matched() {
        let p = pats(&["example.com"]);
        let good = query("example.com");
        // A response, another opcode, two questions, an answer record.
        for (i, v) in [(2, 0x81), (2, 0x28), (5, 2), (7, 1)] {
            let mut q = good.clone();
            q[i] = v;
            assert_eq!(query_matches(&q, &p), None, "byte {i} = {v:#x}");
        }
        // Truncated anywhere: never a match.
        for cut in 0..good.len() {
            assert_eq!(query_matches(&good[..cut], &p), None, "cut at {cut}");
        }
        // A compression pointer in the question.
        let mut q = good.clone();
        q[12] = 0xC0;
        assert_eq!(query_matches(&q, &p), None);
        // EDNS0 OPT record after the question: still a query.
        let mut q = good.clone();
        q[11] = 1;
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(query_matches(&q, &p), Some(true));
    }
}
